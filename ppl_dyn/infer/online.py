r"""Online EM with PaRIS statistics (Cappé 2009; Olsson & Westerborn's online PaRIS EM).

One forward pass over a long or streaming series. The statistic each particle carries is
a stochastic-approximation average of the additive functional of
:mod:`ppl_dyn.infer.paris`:

.. math::
    \tau_t^i = (1 - \gamma_t)\, \frac1K \sum_{k=1}^K \tau_{t-1}^{J^{i,k}}
               + \gamma_t\, s_t(x_{t-1}^{J^{i,k}}, x_t^i)
    \quad(\text{the } s_t \text{ term averaged over } k \text{ too}),

so :math:`\hat S_t = \sum_i w_t^i \tau_t^i` estimates a :math:`\gamma`-weighted average
of the per-step expected sufficient statistics (the count fields average the step
indicators, so the M-step's normalisation by ``n`` is unchanged). Every ``update_every``
steps after the first ``burn_in`` steps the parameters move to the closed-form M-step
map of :math:`\hat S_t` (:class:`~ppl_dyn.infer.mstep.LinearGaussianMStep`); the filter
and the backward kernel then run under the new parameters. Step sizes
:math:`\gamma_t = t^{-\alpha}`, :math:`\alpha \in (0.5, 1]` (the Robbins-Monro
conditions), or any user schedule with values in ``(0, 1]``; ``t`` counts steps over all
passes and :math:`\gamma_1 = 1` forgets the arbitrary start.

The initial-state sites (``m0``, ``P0``) are not updated: a single stream carries no
information about them beyond its first step (their statistic decays like
:math:`\prod_t (1 - \gamma_t)`); they keep their starting values.

Online EM is a run of the EM driver: :class:`StreamingPARIS` is the stateful E-step (one
block of ``update_every`` steps per EM iteration) and :class:`OnlineMStep` the M-step
(held during the burn-in); :class:`OnlineEM` builds the pair and reads its monitor off
the iterations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer._pattern import COMPLETE, with_data_pattern
from ppl_dyn.infer.em import EM, EMResult, check_m_step, initial_params
from ppl_dyn.infer.mstep import LinearGaussianMStep
from ppl_dyn.infer.paris import (
    BackwardKernel,
    initial_tau,
    paris_update,
    weighted_sum,
)
from ppl_dyn.infer.particle import check_filter_args, check_int, filter_init, filter_step
from ppl_dyn.infer.stats import LinearStats
from ppl_dyn.state_space import bind


class OnlineEMMonitor(NamedTuple):
    """Per-block convergence monitor of :class:`OnlineEM` (numpy arrays, one entry per
    block of ``update_every`` steps over all passes).

    Attributes:
        step: global step count at the end of the block (over all passes).
        log_predictive: mean one-step predictive log-likelihood
            ``log p_hat(y_t | y_{1:t-1})`` over the block's steps (under the parameters
            current at each step).
        smoothed_log_predictive: its exponential moving average over blocks.
        param_change: ``|theta_new - theta_old| / max(|theta_old|, 1)`` over the updated
            (free) sites at the block's M-step; 0 without an update.
        updated: whether the block ended with an M-step (False during burn-in).
    """

    step: np.ndarray
    log_predictive: np.ndarray
    smoothed_log_predictive: np.ndarray
    param_change: np.ndarray
    updated: np.ndarray


class OnlineEMResult(NamedTuple):
    """Outcome of :meth:`OnlineEM.run`.

    Attributes:
        params: final values of every parameter site (free and frozen).
        averaged_params: Polyak-Ruppert averages of the updated sites over the second
            half of the M-step updates (all other sites as in ``params``); the averaged
            iterates fluctuate less than the last one.
        trajectory: per updated site, its value after each block ``(num_blocks, ...)``.
        monitor: :class:`OnlineEMMonitor`.
        log_marginals: per pass, the sum of the one-step predictive log-likelihoods
            (a prequential log-likelihood: the parameters change during the pass).
        floor_counts: per covariance site, how many M-steps hit the eigenvalue floor.
        num_steps: steps processed (all passes).
    """

    params: dict
    averaged_params: dict
    trajectory: dict
    monitor: OnlineEMMonitor
    log_marginals: np.ndarray
    floor_counts: dict
    num_steps: int


class OnlineEM:
    r"""Online EM for state-space models with a :class:`~ppl_dyn.LinearStructure`.

    Args:
        model: a NumPyro model (``lds``, ``tanh_rnn``, ``rbf`` or any model declaring a
            ``LinearStructure``).
        num_particles: ``N``.
        num_backward: PaRIS draws ``K`` per particle and step (``K >= 2``; ``K = 1`` is
            degenerate).
        kernel: ``"mcmc"`` (default) or ``"hybrid"`` backward kernel
            (:class:`~ppl_dyn.infer.paris.PARISSmoother`), or a
            :class:`~ppl_dyn.infer.backward.BackwardKernel` value (its fields replace
            ``num_backward``, ``num_mcmc_steps`` and ``max_trials``).
        step_size: the exponent :math:`\alpha \in (0.5, 1]` of
            :math:`\gamma_t = t^{-\alpha}` (default 0.6), or a callable mapping the
            1-based global step numbers (a numpy int array) to step sizes in ``(0, 1]``.
        burn_in: no parameter update during the first ``burn_in`` steps (statistics
            still accumulate).
        update_every: steps between M-steps (a block).
        num_passes: passes over the data; each restarts the filter from the initial
            distribution while the parameters, the step-size clock and the averaged
            statistic carry over.
        resampling, ess_threshold: the bootstrap filter's (see ``ParticleSmoother``).
        num_mcmc_steps, max_trials: backward kernel settings.
        m_step: the closed-form M-step (default ``LinearGaussianMStep()``).
        monitor_decay: weight of the past in ``smoothed_log_predictive`` (in ``[0, 1)``).

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import OnlineEM
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=200,
        ...                      state_dim=1, obs_dim=1)["y"]
        >>> res = OnlineEM(lds, num_particles=100, burn_in=20, update_every=10).run(
        ...     jax.random.key(1), y=y, state_dim=1)
        >>> res.monitor.updated.sum() > 0
        True
    """

    def __init__(
        self,
        model: Callable,
        num_particles: int = 500,
        num_backward: int = 2,
        kernel: Union[str, BackwardKernel] = "mcmc",
        step_size: Union[float, Callable] = 0.6,
        burn_in: int = 100,
        update_every: int = 10,
        num_passes: int = 1,
        resampling: str = "systematic",
        ess_threshold: float = 0.5,
        num_mcmc_steps: int = 1,
        max_trials: int = 10,
        m_step: Optional[LinearGaussianMStep] = None,
        monitor_decay: float = 0.9,
    ):
        check_filter_args(num_particles, resampling, ess_threshold)
        if isinstance(kernel, BackwardKernel):  # the value fixes the three settings
            self.kernel = kernel.check()
        else:
            self.kernel = BackwardKernel(kernel, num_backward, num_mcmc_steps, max_trials).check()
        check_int("burn_in", burn_in, 0)
        check_int("update_every", update_every, 1)
        check_int("num_passes", num_passes, 1)
        if not callable(step_size):
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
                raise ValueError(f"step_size must be a float or a callable; got {step_size!r}")
            if not 0.5 < float(step_size) <= 1.0:
                raise ValueError(
                    f"step_size (the exponent alpha of gamma_t = t^-alpha) must be in "
                    f"(0.5, 1]; got {step_size!r}"
                )
        if not 0.0 <= float(monitor_decay) < 1.0:
            raise ValueError(f"monitor_decay must be in [0, 1); got {monitor_decay!r}")
        m_step = LinearGaussianMStep() if m_step is None else m_step
        if not isinstance(m_step, LinearGaussianMStep):
            raise ValueError(
                f"m_step must be a LinearGaussianMStep (online EM needs the closed-form "
                f"map); got {type(m_step).__name__}"
            )
        if m_step.map_estimate:
            raise ValueError(
                "m_step: online EM maximises the likelihood; LinearGaussianMStep("
                "map_estimate=True) would weigh the prior against an averaged (per-step) "
                "statistic. Use EM with a batch E-step for MAP estimates"
            )
        self.model = model
        self.num_particles = int(num_particles)
        self.step_size = step_size
        self.burn_in = int(burn_in)
        self.update_every = int(update_every)
        self.num_passes = int(num_passes)
        self.resampling = resampling
        self.ess_threshold = float(ess_threshold)
        self.m_step = m_step
        self.monitor_decay = float(monitor_decay)

    def step_sizes(self, num_steps: int) -> np.ndarray:
        """``gamma_1..gamma_n`` (validated: finite, in ``(0, 1]``)."""
        t = np.arange(1, num_steps + 1)
        if callable(self.step_size):
            g = np.asarray(self.step_size(t), dtype=float)
            if g.shape != t.shape:
                raise ValueError(
                    f"step_size(t) must return one value per step, shape {t.shape}; got {g.shape}"
                )
        else:
            g = t ** (-float(self.step_size))
        bad = ~np.isfinite(g) | (g <= 0) | (g > 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"step_size gives gamma_{i + 1} = {g[i]}; values must be in (0, 1]")
        return g

    def run(
        self,
        rng_key: jax.Array,
        *,
        init_params: Union[dict, EMResult, None] = None,
        progress_bar: bool = True,
        **kwargs,
    ) -> OnlineEMResult:
        """One or more passes of online EM over ``y`` (one sequence, ``(T, dy)``).

        Runs ``EM(model, StreamingPARIS(...), OnlineMStep(m_step, hold))`` for
        ``num_passes * ceil((T - 1) / update_every)`` iterations, one block per
        iteration (:meth:`parts`), and reads the monitor off the iterations.

        Args:
            rng_key: PRNG key (initial draws of sites without ``init_params``, filter,
                backward draws).
            init_params: starting values (dict or :class:`EMResult`); missing free sites
                are drawn from their priors.
            progress_bar: show a tqdm progress bar over the blocks.
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``, ...).
        """
        check_rng_key(rng_key)
        params, run_key, kwargs = initial_params(
            self.model,
            rng_key,
            init_params,
            kwargs,
            check=lambda info: check_m_step(self.m_step, info, "OnlineEM", self.model),
        )
        ss, spec = bind(self.model, params, **kwargs)
        if spec.y is None:
            raise ValueError("y is required: online EM learns from observations")
        if spec.num_sequences != 1:
            raise ValueError(
                f"y must hold one sequence (T, dy) for online EM; got {spec.num_sequences} "
                "sequences"
            )
        T = spec.num_steps
        if T < 2:
            raise ValueError(f"y must have at least 2 time steps; got {T}")
        st = ss.structure
        updated = tuple(sorted(set(params) - {st.init_mean, st.init_cov}))
        if not updated:
            raise ValueError(
                "no free dynamics or emission sites: online EM does not update the "
                "initial-state sites"
            )
        self.step_sizes(self.num_passes * T)  # a user schedule checked here, by name
        ends = block_ends(T, self.update_every, self.num_passes)
        e_step, m_step = self.parts(T)
        em = EM(self.model, e_step, m_step)
        em._method = "OnlineEM"
        res = em.run(
            run_key,
            len(ends),
            init_params=params,
            progress_bar=progress_bar,
            keep_params_history=True,
            **kwargs,
        )
        B = len(ends) // self.num_passes
        lls = np.asarray(res.log_marginals)
        # steps per block (the first block of a pass also predicts the pass's first
        # observation: the previous block ended at the end of the previous pass)
        counts = ends - np.concatenate([[0], ends[:-1]])
        lp = lls / counts
        traj = {k: np.asarray(res.params_history[k]) for k in updated}
        before = {k: np.asarray(params[k])[None] for k in updated}
        flat_old = np.concatenate(
            [np.concatenate([before[k], traj[k][:-1]]).reshape(len(ends), -1) for k in updated],
            axis=1,
        )
        flat_new = np.concatenate([traj[k].reshape(len(ends), -1) for k in updated], axis=1)
        upd = ends > self.burn_in
        change = np.linalg.norm(flat_new - flat_old, axis=1) / np.maximum(
            np.linalg.norm(flat_old, axis=1), 1.0
        )
        smooth = np.empty_like(lp)
        acc = lp[0]
        for i, v in enumerate(lp):
            acc = self.monitor_decay * acc + (1 - self.monitor_decay) * v if i else v
            smooth[i] = acc
        monitor = OnlineEMMonitor(ends, lp, smooth, np.where(upd, change, 0.0), upd)
        all_params = dict(res.params)
        averaged = dict(all_params)
        upd_idx = np.flatnonzero(upd)
        if upd_idx.size:
            half = upd_idx[upd_idx.size // 2 :]
            for k in updated:
                averaged[k] = jnp.asarray(np.mean(traj[k][half], 0), dtype=params[k].dtype)
        return OnlineEMResult(
            params=all_params,
            averaged_params=averaged,
            trajectory=traj,
            monitor=monitor,
            log_marginals=lls.reshape(self.num_passes, B).sum(1),
            floor_counts=dict(res.floor_counts),
            num_steps=self.num_passes * T,
        )

    def parts(self, num_steps: int) -> tuple["StreamingPARIS", "OnlineMStep"]:
        """The (E-step, M-step) pair :meth:`run` hands the EM driver for a series of
        ``num_steps`` steps: ``StreamingPARIS`` (one block of ``update_every`` steps per
        iteration) and ``OnlineMStep`` holding the parameters for the blocks that end
        within ``burn_in``."""
        ends = block_ends(num_steps, self.update_every, self.num_passes)
        hold = int(np.sum(ends <= self.burn_in))  # the blocks' ends increase
        e_step = StreamingPARIS(
            num_particles=self.num_particles,
            kernel=self.kernel,
            update_every=self.update_every,
            step_size=self.step_size,
            resampling=self.resampling,
            ess_threshold=self.ess_threshold,
        )
        return e_step, OnlineMStep(self.m_step, hold)


def block_ends(num_steps: int, update_every: int, num_passes: int = 1) -> np.ndarray:
    """The global 1-based step at which each block ends, over ``num_passes`` passes of a
    series of ``num_steps`` steps: a pass starts with step 1 and its blocks cover steps
    ``2..T`` in runs of ``update_every`` (the last one possibly shorter), so the first
    block of a pass ends at step ``1 + update_every``."""
    T, every = int(num_steps), int(update_every)
    B = -(-(T - 1) // every)
    last = np.minimum((np.arange(B) + 1) * every, T - 1)  # 0-based time in the pass
    return (np.arange(num_passes)[:, None] * T + 1 + last[None, :]).reshape(-1)


class StreamState(NamedTuple):
    """What :class:`StreamingPARIS` carries from one block to the next.

    Attributes:
        particles: the filter's particles at the last step processed ``(N, dx)``.
        log_weights: their normalised log-weights ``(N,)``.
        log_marginal: ``log p_hat`` of the pass so far (its sign of life: all weights
            zero make it ``-inf``).
        tau: the PaRIS statistic of each particle (:class:`LinearStats`, leading ``N``).
        block: blocks processed (over all passes).
    """

    particles: jax.Array
    log_weights: jax.Array
    log_marginal: jax.Array
    tau: LinearStats
    block: jax.Array


class StreamPosterior(NamedTuple):
    r"""What one :class:`StreamingPARIS` block hands the M-step.

    Attributes:
        stats: the running average :math:`\hat S_t = \sum_i w_t^i \tau_t^i` at the
            block's last step (already averaged: the M-step maps it as it is).
        log_marginal: the sum of the block's one-step predictive log-likelihoods
            ``(1,)`` (under the parameters entering the block; the first block of a pass
            also predicts the pass's first observation, see :func:`block_ends`).
    """

    stats: LinearStats
    log_marginal: jax.Array

    def linear_statistics(self, ss, y, u, time_mask=None):
        del ss, y, u, time_mask
        return self.stats


class StreamingPARIS(NamedTuple):
    r"""Online PaRIS as a streaming E-step (:class:`~ppl_dyn.infer.protocols.StatefulEStep`):
    each EM iteration advances the bootstrap filter and the PaRIS statistic by one block
    of ``update_every`` steps of the single sequence, under the parameters entering the
    iteration, and hands the M-step the running average :math:`\hat S_t` (see the module
    docstring). After the last block of the series the next iteration starts a new pass
    from the initial distribution, the averaged statistic carried over.

    :class:`OnlineEM` builds it with :class:`OnlineMStep`; it runs in
    ``EM(model, StreamingPARIS(...), OnlineMStep(LinearGaussianMStep(), hold))`` for
    ``num_passes * ceil((T - 1) / update_every)`` iterations.

    Args:
        num_particles, kernel (a :class:`BackwardKernel`), resampling, ess_threshold:
            as :class:`~ppl_dyn.infer.PARISSmoother`.
        update_every: steps per block (per EM iteration).
        step_size: the exponent :math:`\alpha` of :math:`\gamma_t = t^{-\alpha}`, or a
            callable of the 1-based global step numbers (numpy ints; evaluated on the
            host through ``jax.pure_callback``).
        data_pattern: set by the driver (``with_data_pattern``); leave it None.
    """

    deterministic = False  # a random likelihood estimate: marginalize refuses it

    num_particles: int = 100
    kernel: BackwardKernel = BackwardKernel()
    update_every: int = 10
    step_size: Union[float, Callable] = 0.6
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    data_pattern: Optional[str] = None

    def with_data_pattern(self, pattern: Optional[str]) -> "StreamingPARIS":
        return self._replace(data_pattern=pattern)

    def _gammas(self, steps, dtype):
        r""":math:`\gamma` at the 1-based global ``steps`` (int array)."""
        if not callable(self.step_size):
            return steps.astype(dtype) ** -jnp.asarray(self.step_size, dtype)
        fn = self.step_size

        def host(t):
            return np.asarray(fn(np.asarray(t)), dtype=dtype).reshape(np.shape(t))

        return jax.pure_callback(host, jax.ShapeDtypeStruct(steps.shape, dtype), steps)

    def _check(self, y, time_mask):
        if time_mask is not None:
            raise ValueError(
                "StreamingPARIS (online EM) runs over one sequence: ragged lengths "
                "(lengths= or list-valued y) are not supported"
            )
        if y.shape[0] != 1:
            raise ValueError(
                f"y must hold one sequence for StreamingPARIS (online EM); got {y.shape[0]}"
            )
        if y.shape[1] < 2:
            raise ValueError(f"y must have at least 2 time steps; got {y.shape[1]}")

    def init(self, ss, y, u) -> StreamState:  # (step checks the data)
        N, dtype = self.num_particles, y.dtype
        x = jnp.zeros((N, ss.state_dim), dtype)
        tau = initial_tau(ss, x, u[0, 0], y[0, 0], ~jnp.isnan(y[0, 0]))
        return StreamState(
            particles=x,
            log_weights=jnp.full((N,), -jnp.log(N), dtype),
            log_marginal=jnp.zeros((), dtype),
            tau=jax.tree_util.tree_map(jnp.zeros_like, tau),  # S_prev = 0 before a pass
            block=jnp.zeros((), jnp.int32),
        )

    def step(self, rng_key, ss, y, u, state: StreamState, time_mask=None):
        self._check(y, time_mask)
        y, u = y[0], u[0]
        T, every, N = y.shape[0], self.update_every, self.num_particles
        dtype = y.dtype
        complete = self.data_pattern == COMPLETE  # no imputation terms traced
        B = -(-(T - 1) // every)
        p, b = state.block // B, state.block % B
        mask = ~jnp.isnan(y)
        k_init, k_run = jax.random.split(rng_key)

        def fresh(_):  # a pass starts: step 1 from the initial distribution
            x1, lw1, lz1, _ = filter_init(k_init, ss, y[0], u[0], mask[0], N)
            s1 = initial_tau(ss, x1, u[0], y[0], mask[0], complete)
            g1 = self._gammas(jnp.reshape(p * T + 1, (1,)), dtype)[0]
            S_prev = weighted_sum(state.tau, state.log_weights)
            tau1 = jax.tree_util.tree_map(lambda a, s: (1 - g1) * s + g1 * a, s1, S_prev)
            return x1, lw1, lz1, tau1, lz1

        def carry_on(_):
            zero = jnp.zeros((), dtype)
            return (state.particles, state.log_weights, state.log_marginal, state.tau, zero)

        x, lw, logZ, tau, lz1 = jax.lax.cond(b == 0, fresh, carry_on, None)
        t0 = 1 + b * every  # the block's first (0-based) time in the pass
        tt = t0 + jnp.arange(every)
        valid = tt < T
        ti = jnp.minimum(tt, T - 1)  # (steps past the end: masked out below)
        gs = jnp.where(valid, self._gammas(p * T + ti + 1, dtype), 0.0)

        def one(c, inp):
            x_prev, lw_prev, logZ, tau = c
            t, ok, g = inp
            k_res, k_mov, k_back = jax.random.split(jax.random.fold_in(k_run, t), 3)
            y_t, u_t, m_t = y[t], u[t], mask[t]
            xn, lwn, anc, lz, _, _ = filter_step(
                ss, self.resampling, self.ess_threshold, k_res, k_mov, x_prev, lw_prev,
                ~jnp.isfinite(logZ), u_t, y_t, m_t,
            )  # fmt: skip
            taun, _ = paris_update(
                self.kernel, k_back, ss, x_prev, lw_prev, tau, xn, anc, u_t, y_t, m_t,
                1 - g, g, complete,
            )  # fmt: skip
            new = (xn, lwn, logZ + lz, taun)
            out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, c)
            return out, jnp.where(ok, lz, 0.0)

        (x, lw, logZ, tau), lzs = jax.lax.scan(one, (x, lw, logZ, tau), (ti, valid, gs))
        post = StreamPosterior(
            stats=weighted_sum(tau, lw),
            log_marginal=jnp.reshape(jnp.sum(lzs) + lz1, (1,)),
        )
        return post, StreamState(x, lw, logZ, tau, state.block + 1)

    def posterior(self, rng_key, ss, y, u, time_mask=None):
        raise ValueError(
            "StreamingPARIS is a streaming E-step: it runs inside EM, which carries its "
            "state from block to block (OnlineEM builds that run). For the statistics of a "
            "whole series at fixed parameters use PARISSmoother"
        )


class OnlineMStep(NamedTuple):
    r"""The closed-form M-step of online EM (:class:`~ppl_dyn.infer.protocols.StatefulMStep`):
    the wrapped M-step's map of the running-average statistic that
    :class:`StreamingPARIS` hands it, applied to every free site except the
    initial-state ones (a single stream carries no information about them: their
    statistic decays like :math:`\prod_t (1 - \gamma_t)`), and not during the first
    ``hold`` iterations (the burn-in; the statistic still accumulates). Its state counts
    the iterations."""

    m_step: LinearGaussianMStep = LinearGaussianMStep()
    hold: int = 0

    def with_data_pattern(self, pattern):
        return self._replace(m_step=with_data_pattern(self.m_step, pattern))

    def check(self, structure, free_names, method: str = "OnlineEM") -> None:
        self.m_step.check(structure, free_names, method)

    def verify_model(self, info) -> None:
        verify = getattr(self.m_step, "verify_model", None)
        if verify is not None:
            verify(info)

    def statistics(self, posterior, ss, y, u, time_mask=None):
        return self.m_step.statistics(posterior, ss, y, u, time_mask)

    def update(self, stats, ss, free, **kwargs):
        st = ss.structure
        return self.m_step.update(stats, ss, frozenset(free) - {st.init_mean, st.init_cov})

    def init(self, stats, num_iters: Optional[int] = None):
        return jnp.zeros((), jnp.int32)

    def step(self, stats, state, ss, free, **kwargs):
        new, floors = self.update(stats, ss, free)
        do = state >= self.hold
        new = {k: jnp.where(do, v, ss.params[k]) for k, v in new.items()}
        floors = {k: jnp.where(do, v, jnp.zeros_like(v)) for k, v in floors.items()}
        return new, floors, state + 1


__all__ = [
    "OnlineEM",
    "OnlineEMMonitor",
    "OnlineEMResult",
    "OnlineMStep",
    "StreamPosterior",
    "StreamState",
    "StreamingPARIS",
    "block_ends",
]
