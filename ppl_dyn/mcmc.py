"""Posterior sampling: BlackJAX NUTS/HMC on NumPyro's potential, diagnostics, and
per-draw E-step quantities (smoothed states, one-step-ahead log-densities).

The same model function serves every path: ``numpyro.infer.MCMC(NUTS(model))`` samples
the latent states, ``MCMC(NUTS(ppl_dyn.handlers.marginalize(model)))`` integrates them
out, and :func:`run_blackjax` runs BlackJAX's NUTS or HMC with Stan-style window
adaptation on the potential energy NumPyro derives from the model
(``numpyro.infer.util.potential_energy``, with ``unconstrain_fn`` / ``constrain_fn`` for
the transforms): no second model definition, the same constraining transforms and
Jacobians as NumPyro's own NUTS.

Example:
    >>> import jax, ppl_dyn
    >>> from ppl_dyn.models import lds
    >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50, state_dim=1,
    ...                      obs_dim=1)["y"]
    >>> run = ppl_dyn.mcmc.run_blackjax(jax.random.key(1), ppl_dyn.handlers.marginalize(lds),
    ...                                 num_warmup=50, num_samples=50, num_chains=2,
    ...                                 print_summary=False, y=y, state_dim=1)
    >>> run.samples["A"].shape
    (2, 50, 1, 1)
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import constrain_fn, potential_energy, unconstrain_fn

from ppl_dyn._validation import check_params, check_rng_key
from ppl_dyn.draws import (  # noqa: F401  (public here too: ppl_dyn.mcmc.draws_of, ...)
    BlackJAXRun,
    Draws,
    _e_step_of,
    _per_draw,
    _sites,
    _spec_of,
    _trace,
    _tree_depth_from_steps,
    draws_of,
    emission_log_probs,
    one_step_log_probs,
    sampled_states,
    smoothed_states,
    static_spec,
)
from ppl_dyn.infer._run import validate_data
from ppl_dyn.infer.stats import sample_smoothed_paths
from ppl_dyn.state_space import (
    bind,
    innovations_from_states,
    inspect_model,
)

__all__ = [
    "EXTRA_FIELDS",
    "BlackJAXRun",
    "Diagnostics",
    "run_blackjax",
    "diagnose",
    "print_diagnostics",
    "em_init_values",
    "smoothed_states",
    "one_step_log_probs",
    "sample_smoothed_paths",
]

#: ``extra_fields`` to pass to ``numpyro.infer.MCMC.run`` so that
#: :func:`ppl_dyn.to_inference_data` can fill ``sample_stats`` (lp, energy for E-BFMI,
#: step size, number of steps and tree depth, acceptance rate).
EXTRA_FIELDS = (
    "potential_energy",
    "energy",
    "num_steps",
    "accept_prob",
    "adapt_state.step_size",
    "diverging",
)


# --------------------------------------------------------------------------------------
# BlackJAX runner
# --------------------------------------------------------------------------------------


def _positive_int(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def run_blackjax(
    rng_key: jax.Array,
    model: Callable,
    *,
    algorithm: str = "nuts",
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    init_params=None,
    target_acceptance_rate: float = 0.8,
    num_integration_steps: Optional[int] = None,
    max_num_doublings: int = 10,
    step_size: Optional[float] = None,
    dense_mass: bool = False,
    print_summary: bool = True,
    **model_kwargs,
) -> BlackJAXRun:
    """BlackJAX NUTS or HMC on the potential NumPyro derives from ``model``.

    Each chain runs ``blackjax.window_adaptation`` (step size by dual averaging, a
    diagonal or dense mass matrix from windowed variance estimates) for ``num_warmup``
    steps, then ``num_samples`` transitions; chains are vectorised with ``jax.vmap``.

    Args:
        rng_key: PRNG key (required).
        model: a NumPyro model, e.g. ``lds`` (latent states sampled) or
            ``ppl_dyn.handlers.marginalize(lds)`` (states integrated out).
        algorithm: ``"nuts"`` or ``"hmc"`` (then ``num_integration_steps`` is needed).
        num_warmup: adaptation steps per chain; 0 disables adaptation (then pass
            ``step_size``; the inverse mass matrix is the identity).
        num_samples: draws kept per chain.
        num_chains: number of chains.
        init_params: starting values: a dict of site values (missing sites start
            uniformly in ``(-2, 2)`` on the unconstrained scale, NumPyro's default) or
            an :class:`~ppl_dyn.infer.EMResult` (see :func:`em_init_values`).
        target_acceptance_rate: target of the step-size adaptation.
        max_num_doublings: NUTS maximum tree depth.
        dense_mass: adapt a dense instead of a diagonal mass matrix.
        print_summary: print :func:`diagnose`'s report after the run.
        **model_kwargs: the model's arguments (``y=...``, ``state_dim=...``).

    Returns:
        A :class:`BlackJAXRun`; ``ppl_dyn.to_inference_data(run)`` converts it.
    """
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    check_rng_key(rng_key)
    if algorithm not in ("nuts", "hmc"):
        raise ValueError(f"algorithm must be 'nuts' or 'hmc'; got {algorithm!r}")
    num_warmup = _positive_int("num_warmup", num_warmup, 0)
    num_samples = _positive_int("num_samples", num_samples)
    num_chains = _positive_int("num_chains", num_chains)
    extra: dict[str, Any] = {}
    if algorithm == "hmc":
        if num_integration_steps is None:
            raise ValueError("algorithm='hmc' needs num_integration_steps (an int >= 1)")
        extra["num_integration_steps"] = _positive_int(
            "num_integration_steps", num_integration_steps
        )
    else:
        extra["max_num_doublings"] = _positive_int("max_num_doublings", max_num_doublings)
    if num_warmup == 0 and (step_size is None or not float(step_size) > 0):
        raise ValueError("num_warmup=0 (no adaptation) needs a positive step_size")
    if not 0.0 < float(target_acceptance_rate) < 1.0:
        raise ValueError(
            f"target_acceptance_rate must lie in (0, 1); got {target_acceptance_rate!r}"
        )
    model_kwargs = validate_data(model_kwargs)
    values = {} if init_params is None else _init_values(init_params, model, model_kwargs)
    k_init, k_run = jax.random.split(rng_key)
    z_given, free_names = _unconstrained_template(k_init, model, model_kwargs, values)

    def potential_fn(z):
        return potential_energy(model, (), model_kwargs, z)

    @jax.jit  # trace the model once; BlackJAX then reuses the jaxpr (and its gradient)
    def logdensity_fn(z):
        return -potential_fn(z)

    alg = getattr(blackjax, algorithm)

    def one_chain(key):
        k_start, k_warm, k_draw = jax.random.split(key, 3)
        z_init, found = _valid_start(k_start, z_given, free_names, logdensity_fn)
        if num_warmup > 0:
            warmup = blackjax.window_adaptation(
                alg,
                logdensity_fn,
                is_mass_matrix_diagonal=not dense_mass,
                target_acceptance_rate=target_acceptance_rate,
                adaptation_info_fn=get_filter_adapt_info_fn(),
                **extra,
            )
            (state, params), _ = warmup.run(k_warm, z_init, num_steps=num_warmup)
        else:
            dim = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(z_init))
            dtype = jax.tree_util.tree_leaves(z_init)[0].dtype
            eye = jnp.eye(dim, dtype=dtype) if dense_mass else jnp.ones(dim, dtype)
            params = {"step_size": jnp.asarray(step_size, dtype), "inverse_mass_matrix": eye}
            state = alg(logdensity_fn, **{**extra, **params}).init(z_init)
        kernel = alg(logdensity_fn, **{**extra, **params})

        def step(st, k):
            st, inf = kernel.step(k, st)
            out = {
                "diverging": inf.is_divergent,
                "lp": st.logdensity,
                "energy": inf.energy,
                "acceptance_rate": inf.acceptance_rate,
                "n_steps": inf.num_integration_steps,
            }
            if algorithm == "nuts":
                out["tree_depth"] = inf.num_trajectory_expansions
            return st, (st.position, out)

        _, (positions, stats) = jax.lax.scan(step, state, jax.random.split(k_draw, num_samples))
        return positions, stats, params["step_size"], params["inverse_mass_matrix"], found

    keys = jax.random.split(k_run, num_chains)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(one_chain)).lower(keys).compile()
    t1 = time.perf_counter()
    positions, stats, step_sizes, imm, found = compiled(keys)
    jax.block_until_ready(stats)
    timing = {"compile_s": t1 - t0, "sampling_s": time.perf_counter() - t1}
    if not bool(jnp.all(found)):
        raise RuntimeError(
            "could not find a starting point with a finite log density and gradient in "
            f"{_MAX_INIT_TRIES} tries (chains {np.flatnonzero(~np.asarray(found)).tolist()}); "
            "pass init_params"
        )
    stats["step_size"] = jnp.broadcast_to(step_sizes[:, None], stats["lp"].shape)

    def postprocess(z):
        return constrain_fn(model, (), model_kwargs, z, return_deterministic=True)

    samples = jax.jit(jax.vmap(jax.vmap(postprocess)))(positions)
    run = BlackJAXRun(
        samples=samples,
        positions=positions,
        stats=stats,
        step_size=step_sizes,
        inverse_mass_matrix=imm,
        algorithm=algorithm,
        model=model,
        model_kwargs=model_kwargs,
        potential_fn=potential_fn,
        timing=timing,
    )
    if print_summary:
        print_diagnostics(run)
    return run


# --------------------------------------------------------------------------------------
# Starting values from an EM fit
# --------------------------------------------------------------------------------------


_MAX_INIT_TRIES = 100


def _unconstrained_template(rng_key, model, model_kwargs, values):
    """Unconstrained values of every latent site (``values`` where given, a prior draw
    elsewhere) and the names of the sites not given (they start uniformly in (-2, 2),
    NumPyro's ``init_to_uniform``). Traced under ``jax.jit``: one compile instead of an
    eager run of the model (hundreds of small compiles)."""
    found: dict = {}

    def template(key, vals):
        tr = _trace(model, vals, model_kwargs, key)
        latent = {}
        for name, site in tr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if site["fn"].support.is_discrete:
                found["discrete"] = name
            latent[name] = site["value"]
        found["latent"] = tuple(latent)
        return unconstrain_fn(model, (), model_kwargs, latent)

    z = jax.jit(template)(rng_key, values)
    if "discrete" in found:
        raise ValueError(f"site {found['discrete']!r} is discrete; NUTS/HMC need continuous sites")
    return z, tuple(sorted(set(found["latent"]) - set(values)))


def _valid_start(rng_key, z_given, free_names, logdensity_fn):
    """Draw the free sites uniformly in (-2, 2) until the log density and its gradient
    are finite (at most ``_MAX_INIT_TRIES`` draws; compiled with the sampler)."""

    def draw(key):
        keys = jax.random.split(key, max(len(free_names), 1))
        z = dict(z_given)
        for k, name in zip(keys, free_names, strict=False):
            v = z_given[name]
            z[name] = jax.random.uniform(k, jnp.shape(v), jnp.result_type(v), -2.0, 2.0)
        return z

    def ok(z):
        val, grad = jax.value_and_grad(logdensity_fn)(z)
        finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grad)]
        return jnp.isfinite(val) & jnp.all(jnp.stack(finite))

    def cond(c):
        i, _, _, good = c
        return (~good) & (i < _MAX_INIT_TRIES)

    def body(c):
        i, key, _, _ = c
        key, sub = jax.random.split(key)
        z = draw(sub)
        return i + 1, key, z, ok(z)

    k0, k1 = jax.random.split(rng_key)
    z0 = draw(k0)
    _, _, z, good = jax.lax.while_loop(cond, body, (0, k1, z0, ok(z0)))
    return z, good


def em_init_values(result, model: Callable, e_step=None, **model_kwargs) -> dict:
    """Starting values for NUTS from an EM fit (or any dict of parameter values).

    The parameter sites take the fitted values; the latent-state sites (when the model
    samples them) take the smoothed means ``E[x_t | y, theta_EM]``: ``x_1``/``x`` for
    the centred form, the innovations that reproduce the smoothed means for the
    non-centred form. Use with ``NUTS(model, init_strategy=init_to_value(values=...))``
    or ``run_blackjax(..., init_params=...)``.
    """
    from ppl_dyn.infer.em import EMResult

    params = dict(result.params if isinstance(result, EMResult) else result)
    model_kwargs = validate_data(model_kwargs)
    sites = _sites(model, params, model_kwargs)
    free = {k: params[k] for k, st in sites.items() if not st.observed and k in params}
    latent = [k for k, st in sites.items() if st.markov and not st.observed]
    if not latent:
        return free
    e_step = _e_step_of(model, e_step, static_spec(model, free, model_kwargs))

    @jax.jit
    def states(p):
        ss, spec = bind(model, p, **model_kwargs)
        post = e_step.posterior(jax.random.key(0), ss, spec.y, spec.u)
        m_tm = jnp.swapaxes(post.means, 0, 1)  # (T, S, dx), the centred sites' layout
        innovations_site = f"{spec.state_name}_innovations"
        if innovations_site in latent:
            means = post.means if spec.batched else post.means[0]  # as markov returns x
            return {innovations_site: innovations_from_states(spec, means)}
        out = {f"{spec.state_name}_1": m_tm[0]}
        if spec.state_name in latent:
            out[spec.state_name] = m_tm[1:]
        return out

    return {**free, **states(free)}


def _init_values(init_params, model, model_kwargs) -> dict:
    from ppl_dyn.infer.em import EMResult

    if isinstance(init_params, EMResult):
        return em_init_values(init_params, model, **model_kwargs)
    if not isinstance(init_params, dict):
        raise ValueError(
            f"init_params must be a dict of site values or an EMResult; got "
            f"{type(init_params).__name__}"
        )
    known = set(_sites(model, {}, model_kwargs))
    unknown = sorted(set(init_params) - known)
    if unknown:
        raise ValueError(
            f"init_params names sites the model does not have: {unknown}; its sample "
            f"sites are {sorted(known)}"
        )
    # the parameter values: shapes, finiteness and supports, by name, before any
    # compilation (the same checks as EM's starting values)
    info = inspect_model(model, **model_kwargs)
    given = {k: v for k, v in init_params.items() if k in info.free}
    check_params(given, info.free, require_all=False)
    return dict(init_params)


# --------------------------------------------------------------------------------------
# Draws from any source
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


class Diagnostics(NamedTuple):
    """Convergence and sampler-health summary (see :func:`diagnose`)."""

    num_chains: int
    num_draws: int  # per chain
    max_rhat: float  # NaN with one chain
    max_rhat_var: str
    min_ess_bulk: float
    min_ess_bulk_var: str
    min_ess_tail: float
    min_ess_tail_var: str
    num_divergent: int
    bfmi: Optional[np.ndarray]  # E-BFMI per chain, None when energy was not recorded
    num_max_tree_depth: Optional[int]
    problems: tuple  # plain-words warnings; empty when all is well

    @property
    def ok(self) -> bool:
        return not self.problems


def _worst(ds, fn, pick):
    best_val, best_var = None, ""
    for name, arr in ds.data_vars.items():
        vals = np.asarray(arr.values, dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        v = fn(vals)
        if best_val is None or pick(v, best_val):
            best_val, best_var = float(v), str(name)
    return (float("nan") if best_val is None else best_val), best_var


def diagnose(source, *, var_names=None, max_num_doublings: int = 10) -> Diagnostics:
    """R-hat, bulk and tail ESS, divergences, E-BFMI and tree-depth saturation.

    ``source``: a numpyro ``MCMC``, a :class:`BlackJAXRun` or an ``az.InferenceData``.
    Thresholds (Vehtari et al. 2021; Betancourt 2016): R-hat < 1.01, ESS >= 100 per
    chain (bulk and tail), no divergent transitions, E-BFMI >= 0.3.
    """
    import arviz as az

    from ppl_dyn.arviz_io import to_inference_data

    idata = source if isinstance(source, az.InferenceData) else None
    if idata is None:
        idata = to_inference_data(source, log_likelihood=False)
    post = idata.posterior
    if var_names is not None:
        post = post[list(var_names)]
    chains, draws = int(post.sizes["chain"]), int(post.sizes["draw"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant entries give NaN
        if chains > 1:
            rhat = az.rhat(post)
            max_rhat, rhat_var = _worst(rhat, np.max, lambda a, b: a > b)
        else:
            max_rhat, rhat_var = float("nan"), ""
        ess_b, bulk_var = _worst(az.ess(post, method="bulk"), np.min, lambda a, b: a < b)
        ess_t, tail_var = _worst(az.ess(post, method="tail"), np.min, lambda a, b: a < b)
    stats = getattr(idata, "sample_stats", None)
    n_div, bfmi, n_max = 0, None, None
    if stats is not None and "diverging" in stats:
        n_div = int(np.sum(stats["diverging"].values))
    if stats is not None and "energy" in stats:
        bfmi = np.asarray(az.bfmi(idata))
    if stats is not None and "tree_depth" in stats:
        n_max = int(np.sum(stats["tree_depth"].values >= max_num_doublings))
    problems = []
    if chains > 1 and not max_rhat < 1.01:
        problems.append(
            f"R-hat of {rhat_var} is {max_rhat:.3f} (should be < 1.01): the chains disagree, "
            "so they have not converged to one distribution (or sit in different modes); "
            "run longer or start from an EM fit (init_params=...)."
        )
    need = 100 * chains
    for what, val, var in (("bulk", ess_b, bulk_var), ("tail", ess_t, tail_var)):
        if not val >= need:
            problems.append(
                f"{what} ESS of {var} is {val:.0f} (want >= {need}, 100 per chain): too few "
                "effectively independent draws for reliable "
                + ("means" if what == "bulk" else "quantiles and intervals")
                + "; run longer or reparametrise."
            )
    if n_div:
        problems.append(
            f"{n_div} of {chains * draws} transitions diverged: the sampler could not "
            "follow the posterior's curvature there, so the draws may be biased; raise "
            "target_acceptance_rate, use the non-centred form or marginalise the states."
        )
    if bfmi is not None and np.any(bfmi < 0.3):
        low = ", ".join(f"{b:.2f}" for b in bfmi)
        problems.append(
            f"E-BFMI is low ({low}; want >= 0.3): momentum resampling explores the energy "
            "poorly, a sign of heavy tails or a funnel; consider reparametrising."
        )
    if n_max:
        problems.append(
            f"{n_max} transitions hit the maximum tree depth ({max_num_doublings}): the "
            "trajectories were cut short; sampling is inefficient."
        )
    return Diagnostics(
        num_chains=chains,
        num_draws=draws,
        max_rhat=max_rhat,
        max_rhat_var=rhat_var,
        min_ess_bulk=ess_b,
        min_ess_bulk_var=bulk_var,
        min_ess_tail=ess_t,
        min_ess_tail_var=tail_var,
        num_divergent=n_div,
        bfmi=bfmi,
        num_max_tree_depth=n_max,
        problems=tuple(problems),
    )


def format_diagnostics(d: Diagnostics) -> str:
    """A short plain-text report of :class:`Diagnostics`."""
    lines = [
        f"MCMC diagnostics: {d.num_chains} chain(s) x {d.num_draws} draws",
        f"  max R-hat      {d.max_rhat:8.3f}  ({d.max_rhat_var or 'n/a: one chain'})",
        f"  min bulk ESS   {d.min_ess_bulk:8.0f}  ({d.min_ess_bulk_var})",
        f"  min tail ESS   {d.min_ess_tail:8.0f}  ({d.min_ess_tail_var})",
        f"  divergences    {d.num_divergent:8d}",
    ]
    if d.bfmi is not None:
        lines.append("  E-BFMI         " + " ".join(f"{b:.2f}" for b in d.bfmi))
    else:
        lines.append(
            "  E-BFMI         n/a (numpyro: run with extra_fields=ppl_dyn.mcmc.EXTRA_FIELDS)"
        )
    if d.num_max_tree_depth is not None:
        lines.append(f"  max tree depth {d.num_max_tree_depth:8d} transitions")
    if d.problems:
        lines.append("WARNING:")
        lines.extend(f"  - {p}" for p in d.problems)
    else:
        lines.append("All checks passed (R-hat < 1.01, ESS >= 100/chain, no divergences).")
    return "\n".join(lines)


def print_diagnostics(source, **kwargs) -> Diagnostics:
    """Print :func:`format_diagnostics` of :func:`diagnose` and return the diagnostics."""
    d = diagnose(source, **kwargs)
    print(format_diagnostics(d))
    return d
