"""Posterior draws of any source, normalised, and per-draw quantities of the model.

The layer under the samplers' results: a numpyro ``MCMC``, a :class:`BlackJAXRun`, an
``EMResult`` or a dict of draws become one :class:`Draws` value (:func:`draws_of`), and
:func:`_per_draw` maps a function of one draw's parameters over all of them (vmapped,
jitted, in batches). :mod:`ppl_dyn.mcmc` (the samplers and diagnostics),
:mod:`ppl_dyn.arviz_io` and :mod:`ppl_dyn.predictive` build on it; it imports none of
them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers as np_handlers

from ppl_dyn.handlers import marginalized_e_step
from ppl_dyn.infer._run import validate_data
from ppl_dyn.state_space import bind, is_markov_site, masked_log_prob


class BlackJAXRun(NamedTuple):
    """Outcome of :func:`run_blackjax`; arrays have leading axes ``(chain, draw)``.

    Attributes:
        samples: constrained values of every latent site and every deterministic site
            (as NumPyro's ``MCMC.get_samples(group_by_chain=True)``).
        positions: the unconstrained positions the sampler moved in.
        stats: per transition: ``diverging``, ``lp`` (log density = minus the potential
            energy), ``energy`` (Hamiltonian, for E-BFMI), ``acceptance_rate``,
            ``n_steps`` (leapfrog steps), ``tree_depth`` (NUTS only) and ``step_size``.
        step_size: adapted step size per chain.
        inverse_mass_matrix: adapted inverse mass matrix per chain (flattened position).
        algorithm: ``"nuts"`` or ``"hmc"``.
        model: the model function sampled.
        model_kwargs: its keyword arguments (the data).
        potential_fn: NumPyro's potential energy of an unconstrained position dict.
        timing: seconds spent compiling (``compile_s``) and running warmup plus
            sampling (``sampling_s``) for all chains.
    """

    samples: dict
    positions: dict
    stats: dict
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    algorithm: str
    model: Callable
    model_kwargs: dict
    potential_fn: Callable
    timing: Optional[dict] = None

    @property
    def num_chains(self) -> int:
        return int(self.stats["lp"].shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.stats["lp"].shape[1])


def _trace(model, params: dict, model_kwargs: dict, rng_key=0) -> dict:
    """Trace ``model`` with ``params`` substituted (other sites drawn from ``rng_key``)."""
    fn = np_handlers.seed(np_handlers.substitute(model, data=params), rng_seed=rng_key)
    return np_handlers.trace(fn).get_trace(**model_kwargs)


class _Site(NamedTuple):
    observed: bool
    markov: bool  # a state / observation site sampled by ppl_dyn.markov


def _sites(model, params: dict, model_kwargs: dict) -> dict:
    """Sample sites of ``model`` (name -> :class:`_Site`), traced abstractly with
    ``jax.eval_shape`` (no eager run of the model, no compile)."""
    found: dict = {}

    def f(p):
        tr = _trace(model, p, model_kwargs)
        for k, site in tr.items():
            if site["type"] == "sample":
                found[k] = _Site(bool(site["is_observed"]), is_markov_site(site))
        return 0

    jax.eval_shape(f, params)
    return found


def static_spec(model, params: dict, model_kwargs: dict):
    """The model's :class:`~ppl_dyn.state_space.MarkovSpec` at ``params`` with concrete
    (normalised) ``y`` and ``u`` and without the distributions, from one small compiled
    trace instead of an eager run."""
    box: dict = {}

    def f(p):
        _, spec = bind(model, p, **model_kwargs)
        box["spec"] = spec
        return (jnp.zeros(()) if spec.y is None else spec.y), spec.u

    y, u = jax.jit(f)(params)
    spec = box["spec"]
    return spec._replace(
        init=None, transition=None, emission=None, y=None if spec.y is None else y, u=u
    )


class Draws(NamedTuple):
    """Posterior draws of any source, normalised (internal)."""

    samples: dict  # (chain, draw, ...)
    stats: dict  # (chain, draw) sample statistics (may be empty)
    model: Callable
    model_kwargs: dict
    kind: str  # "numpyro", "blackjax", "em", "dict"


def draws_of(source, model=None, model_kwargs: Optional[dict] = None) -> Draws:
    """Normalise a numpyro ``MCMC``, a :class:`BlackJAXRun`, an ``EMResult`` or a dict
    of draws with leading ``(chain, draw)`` axes."""
    from numpyro.infer import MCMC

    from ppl_dyn.infer.em import EMResult

    model_kwargs = dict(model_kwargs or {})
    if isinstance(source, MCMC):
        m, kw = _mcmc_model_and_kwargs(source)
        samples = source.get_samples(group_by_chain=True)
        stats = {}
        fields = source.get_extra_fields(group_by_chain=True)
        for k, v in fields.items():
            if not isinstance(v, (dict, tuple)):
                stats[k] = v
        return Draws(samples, stats, model or m, {**kw, **model_kwargs}, "numpyro")
    if isinstance(source, BlackJAXRun):
        return Draws(
            source.samples,
            source.stats,
            model or source.model,
            {**source.model_kwargs, **model_kwargs},
            "blackjax",
        )
    if model is None:
        raise ValueError(
            f"a {type(source).__name__} does not record its model: pass model=... and the "
            "model's keyword arguments (y=..., state_dim=...)"
        )
    model_kwargs = validate_data(model_kwargs)
    if isinstance(source, EMResult):
        samples = {k: jnp.asarray(v)[None, None] for k, v in source.params.items()}
        return Draws(samples, {}, model, model_kwargs, "em")
    if isinstance(source, dict):
        return Draws(dict(source), {}, model, model_kwargs, "dict")
    raise ValueError(
        "expected a numpyro MCMC, a BlackJAXRun, an EMResult or a dict of draws; got "
        f"{type(source).__name__}"
    )


def _mcmc_model_and_kwargs(mcmc):
    """Model and keyword arguments of a numpyro ``MCMC`` after ``run`` (the only place
    that reads its private ``_args`` / ``_kwargs``)."""
    args = getattr(mcmc, "_args", None)
    kwargs = getattr(mcmc, "_kwargs", None)
    if kwargs is None:
        raise ValueError("the MCMC object has not been run yet")
    if args:
        raise ValueError(
            "pass the model's data as keyword arguments to MCMC.run (y=..., state_dim=...)"
        )
    return mcmc.sampler.model, dict(kwargs)


def _flat(samples: dict):
    """``(chain, draw, ...)`` -> ``(chain * draw, ...)`` and the leading shape."""
    lead = next(iter(samples.values())).shape[:2]
    return {k: jnp.reshape(v, (-1,) + v.shape[2:]) for k, v in samples.items()}, lead


def _unflat(tree, lead):
    return jax.tree_util.tree_map(lambda a: jnp.reshape(a, lead + a.shape[1:]), tree)


def _per_draw(fn, draws: Draws, *extra, batch_size: int = 256):
    """Apply ``fn(params, *extra_i) -> pytree`` to every draw (vmapped, jitted, in
    batches); ``extra`` arrays have the same leading ``(chain, draw)`` axes."""
    flat, lead = _flat(draws.samples)
    extra = [jnp.reshape(a, (-1,) + a.shape[2:]) for a in extra]
    n = int(np.prod(lead))
    size = min(n, batch_size)
    pad = -n % size  # repeat the last draw so that every batch has one shape (one compile)

    def padded(a):
        return jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)], 0) if pad else a

    flat = {k: padded(v) for k, v in flat.items()}
    extra = [padded(a) for a in extra]
    f = jax.jit(jax.vmap(fn))
    outs = []
    for i in range(0, n + pad, size):
        sl = slice(i, i + size)
        outs.append(f({k: v[sl] for k, v in flat.items()}, *[a[sl] for a in extra]))
    out = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0)[:n], *outs)
    return _unflat(out, lead)


def _e_step_of(model, e_step, spec=None):
    """The E-step to use: the given one, the marginalising one, or
    :class:`~ppl_dyn.infer.auto.AutoSmoother` (Kalman for linear-Gaussian models, the
    extended Kalman smoother for Gaussian noise with nonlinear means, particles
    otherwise; chosen from the model when it is bound)."""
    del spec  # the choice is made from the bound model
    if e_step is not None:
        if not callable(getattr(e_step, "posterior", None)):
            raise ValueError(
                "e_step must have a posterior(rng_key, state_space, y, u) method; got "
                f"{type(e_step).__name__}"
            )
        return e_step
    found = marginalized_e_step(model)
    if found is not None:
        return found
    from ppl_dyn.infer.auto import AutoSmoother

    return AutoSmoother()


def _spec_of(draws: Draws):
    """The model's declaration at the first draw (see :func:`static_spec`)."""
    first = {k: v[0, 0] for k, v in draws.samples.items()}
    return static_spec(draws.model, first, draws.model_kwargs)


def smoothed_states(source, e_step=None, *, model=None, **model_kwargs):
    """The E-step's posterior of the states for every draw.

    Returns the E-step's posterior (e.g. a ``GaussianPosterior``) with leading axes
    ``(chain, draw)``, then the sequence axis when ``y`` has one. With the
    :class:`~ppl_dyn.infer.KalmanSmoother` these are exact ``p(x_t | y, theta)`` per
    draw; mixing over draws gives the states' posterior under parameter uncertainty.
    """
    draws = draws_of(source, model, model_kwargs)
    e = _e_step_of(draws.model, e_step, _spec_of(draws))
    kw = draws.model_kwargs

    def fn(params):
        ss, spec = bind(draws.model, params, **kw)
        post = e.posterior(jax.random.key(0), ss, spec.y, spec.u)
        return post if spec.batched else jax.tree_util.tree_map(lambda a: a[0], post)

    return _per_draw(fn, draws)


def one_step_log_probs(source, e_step=None, *, model=None, **model_kwargs) -> jax.Array:
    """``log p(y_t | y_{1:t-1}, theta)`` per draw and step: ``(chain, draw, [S,] T)``.

    They sum over time to the log-marginal likelihood of each draw.
    """
    draws = draws_of(source, model, model_kwargs)
    e = _e_step_of(draws.model, e_step, _spec_of(draws))
    kw = draws.model_kwargs

    def fn(params):
        ss, spec = bind(draws.model, params, **kw)
        lp = e.posterior(jax.random.key(0), ss, spec.y, spec.u).predicted_log_probs
        return lp if spec.batched else lp[0]

    return _per_draw(fn, draws)


def sampled_states(samples: dict, spec) -> Optional[jax.Array]:
    """The states of one draw as ``(S, T, dx)`` from the sites :func:`ppl_dyn.markov`
    samples (``x_1`` and ``x``), or None when the draw has none (marginalised, EM)."""
    name1, name = f"{spec.state_name}_1", spec.state_name
    if name1 not in samples:
        return None
    x1 = samples[name1]  # (S, dx)
    if spec.num_steps == 1:
        return x1[:, None]
    return jnp.concatenate([x1[None], samples[name]], 0).swapaxes(0, 1)  # (S, T, dx)


def emission_log_probs(source, *, model=None, **model_kwargs) -> jax.Array:
    """``log p(y_t | x_t, theta)`` per draw and step, ``(chain, draw, [S,] T)``, for
    draws that carry the states (latent-state NUTS/HMC): the model's own emission
    distribution at the sampled states, missing entries dropped (the values NumPyro's
    ``log_likelihood`` gives for the observation sites, joined over time)."""
    draws = draws_of(source, model, model_kwargs)
    kw = draws.model_kwargs

    def fn(params):
        ss, spec = bind(draws.model, params, **kw)
        xs = sampled_states(params, spec)
        if xs is None:
            raise ValueError("the draws carry no states (x_1, x); use one_step_log_probs")
        mask = ~jnp.isnan(spec.y)
        lp = masked_log_prob(ss.emission(xs, spec.u), jnp.where(mask, spec.y, 0.0), mask)
        return lp if spec.batched else lp[0]

    return _per_draw(fn, draws)


def _tree_depth_from_steps(n_steps) -> np.ndarray:
    """NUTS tree depth from the number of leapfrog steps (ArviZ's convention)."""
    n = np.maximum(np.asarray(n_steps), 1)
    return (np.log2(n).astype(int) + 1).astype(np.int64)
