r"""Particle stochastic approximation EM (PSAEM; Lindsten 2013) with CPF-AS.

At iteration ``k`` (``docs/psaem.md``):

1. run CPF-AS (:mod:`ppl_dyn.infer.cpf`) at :math:`\theta_{k-1}` conditioned on the
   reference path :math:`x'_{1:T}[k-1]`;
2. :math:`\hat S_k = (1-\gamma_k)\hat S_{k-1} + \gamma_k \sum_i w_T^i\, s(x^i_{1:T})`
   over the ``N`` weighted ancestral paths (the additive
   :class:`~ppl_dyn.infer.LinearStats` of the closed-form M-step);
3. :math:`\theta_k = \Lambda(\hat S_k)`: the *same* M-step map as EM
   (:meth:`LinearGaussianMStep.update`), so frozen (conditioned) sites stay fixed;
4. the new reference is the ancestral path of ``k ~ Cat(w_T)``.

With :math:`\sum_k\gamma_k=\infty`, :math:`\sum_k\gamma_k^2<\infty` the iterates converge
(under regularity conditions) to a stationary point of the likelihood for a *fixed*
number of particles ``N >= 2``; ``gamma_k = 1`` is a noisy particle EM whose iterates
keep fluctuating.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ppl_dyn.infer._pattern import assume_pattern, data_pattern
from ppl_dyn.infer._run import (
    check_mask_support,
    hashable_items,
    jit_model,
    mask_arg,
    ragged_data,
    split_static,
    statistics_with_mask,
)
from ppl_dyn.infer.cpf import conditional_particle_filter, path_posterior
from ppl_dyn.infer.em import EMResult, check_m_step, initial_params, warn_floors
from ppl_dyn.infer.mstep import GradientMStep, LinearGaussianMStep
from ppl_dyn.state_space import bind

__all__ = ["PSAEM", "PSAEMState", "PSAEMResult", "step_size_schedule"]


def step_size_schedule(burn_in: int = 20, alpha: float = 0.7, scale: float = 1.0) -> Callable:
    r"""The step sizes :math:`\gamma_k` (``k = 1, 2, ...``): ``1`` for ``k <= burn_in``,
    then :math:`\mathrm{scale}\,(k - \mathrm{burn\_in})^{-\alpha}`.

    With :math:`\alpha \in (0.5, 1]` the schedule satisfies the stochastic-approximation
    conditions :math:`\sum\gamma_k = \infty`, :math:`\sum\gamma_k^2 < \infty`. Svensson's
    choice (1 for ``k <= 20``, 0.9 up to 50, then :math:`0.9(k-50)^{-0.7}`) is close to
    ``step_size_schedule(50, 0.7, 0.9)``.

    Args:
        burn_in: iterations with :math:`\gamma_k = 1` (plain particle EM: the iterates
            move fast from a poor start).
        alpha: decay exponent, in ``(0.5, 1]``.
        scale: factor after the burn-in, in ``(0, 1]``.
    """
    if not isinstance(burn_in, (int, np.integer)) or isinstance(burn_in, bool) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0; got {burn_in!r}")
    if not 0.5 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in (0.5, 1]; got {alpha!r}")
    if not 0.0 < float(scale) <= 1.0:
        raise ValueError(f"scale must lie in (0, 1]; got {scale!r}")
    burn_in, alpha, scale = int(burn_in), float(alpha), float(scale)

    def gamma(k: int) -> float:
        return 1.0 if k <= burn_in else scale * float(k - burn_in) ** (-alpha)

    return gamma


def _step_sizes(step_size, num_iters: int) -> np.ndarray:
    """``gamma_1..gamma_K`` as an array, validated; ``gamma_1`` is always 1."""
    if step_size is None:
        step_size = step_size_schedule(burn_in=num_iters // 4)
    if callable(step_size):
        g = np.array([float(step_size(k)) for k in range(1, num_iters + 1)])
    elif np.ndim(step_size) == 0:
        g = np.full(num_iters, float(step_size))
    else:
        g = np.asarray(step_size, float).reshape(-1)
        if g.shape[0] < num_iters:
            raise ValueError(
                f"step_size has {g.shape[0]} entries; num_iters={num_iters} needs as many"
            )
        g = g[:num_iters].copy()
    bad = ~(np.isfinite(g) & (g > 0) & (g <= 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"step_size must lie in (0, 1]; gamma_{i + 1} = {g[i]!r}")
    g[0] = 1.0  # S_0 is undefined: the first statistics are taken as they are
    return g


class PSAEMState(NamedTuple):
    """What PSAEM carries between iterations.

    Attributes:
        params: values of the free parameter sites.
        stats: the stochastic-approximation average :math:`\\hat S_k`
            (:class:`~ppl_dyn.infer.LinearStats`).
        references: reference paths ``(S, T, dx)``, one per sequence.
        iteration: iterations done.
        rng_key: key for the next iteration.
    """

    params: dict
    stats: object
    references: jax.Array
    iteration: int
    rng_key: jax.Array


class PSAEMResult(NamedTuple):
    """Outcome of :meth:`PSAEM.run`.

    Attributes:
        params: final values of every parameter site (free and frozen).
        state: the final :class:`PSAEMState`.
        log_marginals: per iteration, the CPF's ``sum_t log mean_i g(y_t | x_t^i)`` at
            the parameters entering it. Conditional on a reference path this is *not* an
            unbiased estimate of ``log p(y | theta)`` (it is pulled towards the
            reference): a progress trace only. For the likelihood of the final
            parameters run a particle filter or, for an LDS, the Kalman filter.
        params_history: free site -> values after each iteration ``(num_iters, ...)``.
        step_sizes: the ``gamma_k`` used ``(num_iters,)`` (``gamma_1 = 1``).
        floor_counts: per covariance site, how many iterations hit the eigenvalue floor.
        num_iters: iterations run.
    """

    params: dict
    state: PSAEMState
    log_marginals: np.ndarray
    params_history: dict
    step_sizes: np.ndarray
    floor_counts: dict
    num_iters: int


class PSAEM:
    """Particle SAEM with a conditional particle filter with ancestor sampling.

    Args:
        model: a model function declaring its dynamics with :func:`ppl_dyn.markov` and a
            :class:`~ppl_dyn.LinearStructure` (built-in ``lds``, ``tanh_rnn``, ``rbf``).
        num_particles: ``N >= 2``; small values (5-50) suffice, the step sizes do the
            averaging.
        step_size: ``None`` (default: ``step_size_schedule(burn_in=num_iters // 4,
            alpha=0.7)``), a constant in ``(0, 1]`` (``1``: noisy particle EM), a callable
            ``k -> gamma_k`` (``k = 1, 2, ...``) or an array of at least ``num_iters``
            values. For convergence the schedule must satisfy ``sum gamma_k = inf`` and
            ``sum gamma_k^2 < inf`` (not checked). ``gamma_1`` is always taken as 1.
        m_step: a closed-form M-step (default :class:`LinearGaussianMStep`); its
            ``update`` maps the averaged statistics to parameters, as in EM.
        ancestor_sampling: False runs the plain conditional filter (for comparison only:
            it mixes poorly, so the iterates move slowly).

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import PSAEM
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=100,
        ...                      state_dim=1, obs_dim=1)["y"]
        >>> res = PSAEM(lds, num_particles=10).run(jax.random.key(1), 50, y=y,
        ...                                        state_dim=1, progress_bar=False)
        >>> res.params_history["A"].shape
        (50, 1, 1)
    """

    def __init__(
        self,
        model: Callable,
        num_particles: int = 20,
        step_size=None,
        m_step=None,
        *,
        ancestor_sampling: bool = True,
    ):
        if (
            not isinstance(num_particles, (int, np.integer))
            or isinstance(num_particles, bool)
            or num_particles < 2
        ):
            raise ValueError(f"num_particles must be an int >= 2; got {num_particles!r}")
        m_step = LinearGaussianMStep() if m_step is None else m_step
        if isinstance(m_step, GradientMStep):
            raise ValueError(
                "m_step: PSAEM averages sufficient statistics, so it needs a closed-form "
                "M-step (LinearGaussianMStep); GradientMStep has none"
            )
        self.model = model
        self.num_particles = int(num_particles)
        self.step_size = step_size
        self.m_step = m_step
        self.ancestor_sampling = bool(ancestor_sampling)

    def run(
        self,
        rng_key: jax.Array,
        num_iters: int,
        *,
        init_params: Union[dict, EMResult, PSAEMResult, None] = None,
        progress_bar: bool = True,
        lengths=None,
        **kwargs,
    ) -> PSAEMResult:
        """Run ``num_iters`` PSAEM iterations.

        Args:
            rng_key: PRNG key (initialisation draws and the particle filters).
            num_iters: number of iterations (>= 1).
            init_params: starting values (a dict, an ``EMResult`` or a ``PSAEMResult``);
                missing free sites are drawn from their priors.
            progress_bar: show a tqdm progress bar.
            lengths: sequences of different lengths, as in :meth:`EM.run`: padded ``y``
                ``(S, T, dy)`` (and ``u``) with ``lengths`` ``(S,)``, or ``y`` (and
                ``u``) as lists of arrays ``(L_s, dim)``. Each CPF-AS sweep stops at its
                sequence's end (:func:`~ppl_dyn.infer.cpf.conditional_particle_filter`
                with ``time_mask``) and the statistics drop the steps past it.
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``, ...).

        Raises:
            FloatingPointError: when an iteration produces a non-finite parameter (the
                message names the iteration and the site) or log-likelihood trace.
        """
        if (
            not isinstance(num_iters, (int, np.integer))
            or isinstance(num_iters, bool)
            or num_iters < 1
        ):
            raise ValueError(f"num_iters must be a positive int; got {num_iters!r}")
        gammas = _step_sizes(self.step_size, int(num_iters))
        kwargs, time_mask = ragged_data(kwargs, lengths)
        check_mask_support(self.m_step, time_mask)
        extra = mask_arg(time_mask)
        if isinstance(init_params, PSAEMResult):
            init_params = init_params.params
        params, key, kwargs = initial_params(
            self.model,
            rng_key,
            init_params,
            kwargs,
            check=lambda info: check_m_step(self.m_step, info, "PSAEM", self.model),
        )
        step, shapes, dynamic = self._compiled(kwargs, time_mask)
        stats_shape, ref_shape = shapes(params, dynamic)
        stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
        refs = jnp.zeros(ref_shape.shape, ref_shape.dtype)
        history: dict = {k: [] for k in params}
        lls: list[float] = []
        floor_counts: dict = {}
        bar = tqdm(range(num_iters), disable=not progress_bar, desc="PSAEM", leave=False)
        for it in bar:
            key, sub = jax.random.split(key)
            first = jnp.asarray(it == 0)
            gamma = jnp.asarray(gammas[it], dtype=ref_shape.dtype)
            new_params, stats, refs, ll, floors, finite = step(
                params, stats, refs, first, gamma, dynamic, sub, *extra
            )
            bad = [k for k, ok in finite.items() if not bool(ok)]
            if bad:
                raise FloatingPointError(
                    f"PSAEM iteration {it}: the M-step produced non-finite values for {bad}"
                )
            ll = float(ll)
            if not np.isfinite(ll):
                raise FloatingPointError(
                    f"PSAEM iteration {it}: the particle filter's log-likelihood is {ll} at "
                    "the parameters entering this iteration"
                )
            for k, v in floors.items():
                floor_counts[k] = floor_counts.get(k, 0) + int(v)
            params = new_params
            for k, v in params.items():
                history[k].append(np.asarray(v))
            lls.append(ll)
            if progress_bar and (it % 10 == 0 or it == num_iters - 1):
                bar.set_postfix(log_lik=f"{ll:.4f}", refresh=False)
        bar.close()
        warn_floors("PSAEM", floor_counts)
        ss, _ = bind(self.model, params, **kwargs)
        return PSAEMResult(
            params=dict(ss.params),
            state=PSAEMState(params, stats, refs, int(num_iters), key),
            log_marginals=np.asarray(lls),
            params_history={k: np.stack(v) for k, v in history.items()},
            step_sizes=gammas,
            floor_counts=floor_counts,
            num_iters=int(num_iters),
        )

    def _compiled(self, kwargs, time_mask=None):
        dynamic, static = split_static(kwargs)
        items = hashable_items(static)
        pattern = data_pattern(dynamic.get("y"), time_mask)
        args = (self.model, self.num_particles, self.ancestor_sampling, self.m_step)
        if items is None:
            step, shapes = _make_step(*args, tuple(static.items()), pattern)
        else:
            step, shapes = _cached_step(*args, items, pattern)
        return step, shapes, dynamic


def _make_step(model, num_particles, ancestor_sampling, m_step, static_items, pattern=None):
    static = dict(static_items)

    def sweep(params, refs, first, dynamic, rng_key, time_mask=None):
        """CPF-AS on every sequence; the new statistics sum_i w_T^i s(x^i) (time_mask
        (S, T), ragged lengths: each sweep stops at its end, later steps count 0)."""
        kwargs = {**static, **dynamic}
        ss, spec = bind(model, params, **kwargs)
        feature = ss.structure.dynamics.features
        keys = jax.random.split(rng_key, spec.y.shape[0])
        masks = jnp.ones(spec.y.shape[:2], bool) if time_mask is None else time_mask

        def one(key, y_s, u_s, ref, mask_s):
            out = conditional_particle_filter(
                key,
                ss,
                y_s,
                u_s,
                ref,
                num_particles,
                conditional=~first,
                ancestor_sampling=ancestor_sampling,
                time_mask=mask_s,
            )
            return out, path_posterior(out, feature)

        outs, post = jax.vmap(one)(keys, spec.y, spec.u, refs, masks)
        stats = statistics_with_mask(m_step, post, ss, spec.y, spec.u, time_mask)
        return ss, stats, outs

    def shapes(params, dynamic):
        def f(params, dynamic):
            kwargs = {**static, **dynamic}
            _, spec = bind(model, params, **kwargs)
            S, T = spec.y.shape[:2]
            refs = jnp.zeros((S, T, spec.state_dim), spec.y.dtype)
            _, stats, outs = sweep(params, refs, jnp.asarray(True), dynamic, jax.random.key(0))
            return stats, outs.reference

        with assume_pattern(pattern):
            return jax.eval_shape(f, params, dynamic)

    @assume_pattern(pattern)
    def step(params, stats_prev, refs, first, gamma, dynamic, rng_key, time_mask=None):
        # time_mask (S, T), ragged lengths: a traced argument; None compiles without it
        ss, stats_new, outs = sweep(params, refs, first, dynamic, rng_key, time_mask)
        stats = jax.tree_util.tree_map(
            lambda a, b: (1.0 - gamma) * a + gamma * b, stats_prev, stats_new
        )
        kwargs = {**static, **dynamic}
        new, floors = m_step.update(stats, ss, frozenset(params), model=model, model_kwargs=kwargs)
        new_params = {k: new.get(k, v) for k, v in params.items()}
        finite = {k: jnp.all(jnp.isfinite(v)) for k, v in new_params.items()}
        ll = jnp.sum(outs.log_marginal)
        return new_params, stats, outs.reference, ll, floors, finite

    return jit_model(step), shapes


@functools.lru_cache(maxsize=64)
def _cached_step(model, num_particles, ancestor_sampling, m_step, static_items, pattern=None):
    return _make_step(model, num_particles, ancestor_sampling, m_step, static_items, pattern)
