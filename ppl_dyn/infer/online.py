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
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._loop import run_loop
from ppl_dyn.infer._pattern import COMPLETE, data_pattern
from ppl_dyn.infer._run import split_static, static_items
from ppl_dyn.infer.em import EMResult, check_m_step, initial_params
from ppl_dyn.infer.mstep import LinearGaussianMStep
from ppl_dyn.infer.paris import (
    BackwardKernel,
    _check_int,
    check_filter_args,
    initial_tau,
    paris_update,
    weighted_sum,
)
from ppl_dyn.infer.particle import filter_init, filter_step
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
        _check_int("burn_in", burn_in, 0)
        _check_int("update_every", update_every, 1)
        _check_int("num_passes", num_passes, 1)
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

        Args:
            rng_key: PRNG key (initial draws of sites without ``init_params``, filter,
                backward draws).
            init_params: starting values (dict or :class:`EMResult`); missing free sites
                are drawn from their priors.
            progress_bar: show a tqdm progress bar over the passes.
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
        B = -(-(T - 1) // self.update_every)
        gammas = self.step_sizes(self.num_passes * T).reshape(self.num_passes, T)
        dynamic, static = split_static(kwargs)
        args = (
            self.model,
            self.kernel,
            self.num_particles,
            self.resampling,
            self.ess_threshold,
            self.m_step,
            self.update_every,
            B,
            static_items(static),
            updated,
            data_pattern(dynamic.get("y")),
        )
        fn = cached_program(("online_em_pass",) + args, lambda: _make_pass(*args))
        # the averaged statistic carried between passes (zeros before the first: with
        # tau_1 = (1 - gamma_1) S_prev + gamma_1 s_1 the start is forgotten at gamma_1 = 1)
        x0 = jnp.zeros((1, spec.state_dim), spec.y.dtype)
        shapes = jax.eval_shape(
            lambda: weighted_sum(
                initial_tau(ss, x0, spec.u[0, 0], spec.y[0, 0], ~jnp.isnan(spec.y[0, 0])),
                jnp.zeros((1,), spec.y.dtype),
            )
        )
        S_prev = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        blocks, lls, floor_counts = [], [], {}
        last = [(params, S_prev)]  # the accepted pass's parameters and statistic

        def launch(p, carry):  # one compiled pass (asynchronous)
            params, S_prev = carry
            key = jax.random.fold_in(run_key, p)
            return fn(params, S_prev, dynamic, key, jnp.asarray(gammas[p]), p * T, self.burn_in)

        def accept(p, pending):
            params, S_prev, out = pending
            out = jax.tree_util.tree_map(np.asarray, out)
            blocks.append(out)
            lls.append(float(out["log_marginal"]))
            for k, v in out["floors"].items():
                floor_counts[k] = floor_counts.get(k, 0) + int(np.sum(v))
            if not all(np.all(np.isfinite(np.asarray(v))) for v in params.values()):
                bad = [k for k, v in params.items() if not np.all(np.isfinite(np.asarray(v)))]
                raise FloatingPointError(f"online EM pass {p}: non-finite values for {bad}")
            last[0] = (params, S_prev)
            return lls[-1], lls[-1]

        run_loop(
            launch,
            lambda pending: pending[:2],
            accept,
            last[0],
            self.num_passes,
            desc="OnlineEM",
            progress_bar=progress_bar,
        )
        params, S_prev = last[0]
        cat = {k: np.concatenate([b[k] for b in blocks]) for k in ("step", "lp", "dtheta", "upd")}
        traj = {k: np.concatenate([b["traj"][k] for b in blocks]) for k in updated}
        smooth = np.empty_like(cat["lp"])
        acc = cat["lp"][0]
        for i, v in enumerate(cat["lp"]):
            acc = self.monitor_decay * acc + (1 - self.monitor_decay) * v if i else v
            smooth[i] = acc
        monitor = OnlineEMMonitor(
            cat["step"], cat["lp"], smooth, cat["dtheta"], cat["upd"].astype(bool)
        )
        all_params = dict(bind(self.model, params, **kwargs)[0].params)
        averaged = dict(all_params)
        upd_idx = np.flatnonzero(monitor.updated)
        if upd_idx.size:
            half = upd_idx[upd_idx.size // 2 :]
            for k in updated:
                averaged[k] = jnp.asarray(np.mean(traj[k][half], 0), dtype=params[k].dtype)
        return OnlineEMResult(
            params=all_params,
            averaged_params=averaged,
            trajectory=traj,
            monitor=monitor,
            log_marginals=np.asarray(lls),
            floor_counts=floor_counts,
            num_steps=self.num_passes * T,
        )


def _flat(params, names):
    return jnp.concatenate([jnp.ravel(params[k]) for k in names])


def _make_pass(model, kernel, N, resampling, thr, m_step, every, B, static_items, updated, pattern):
    """A jitted pass: ``(params, S_prev, dynamic, key, gammas, n0, burn_in) ->
    (params, S, outputs)``."""
    static = dict(static_items)
    free = frozenset(updated)
    complete = pattern == COMPLETE  # known from the data: no imputation terms traced

    def one_pass(params, S_prev, dynamic, key, gammas, n0, burn_in):
        kwargs = {**static, **dynamic}
        ss0, spec = bind(model, params, **kwargs)
        y, u = spec.y[0], spec.u[0]
        T = y.shape[0]
        dtype = y.dtype
        mask = ~jnp.isnan(y)
        pad = B * every - (T - 1)

        # steps 2..T in B blocks of `every`, padded with invalid steps
        def blocked(a, fill):
            tail = jnp.full((pad,) + a.shape[1:], fill, a.dtype)
            return jnp.concatenate([a[1:], tail]).reshape((B, every) + a.shape[1:])

        ys, us, ms = blocked(y, 0.0), blocked(u, 0.0), blocked(mask, False)
        valid = blocked(jnp.ones((T,), bool), False)
        gs = blocked(gammas.astype(dtype), 0.0)
        tt = blocked(jnp.arange(T), 0)  # 0-based time in the pass

        k_init, k_run = jax.random.split(key)
        x1, lw1, lz1, _ = filter_init(k_init, ss0, y[0], u[0], mask[0], N)
        s1 = initial_tau(ss0, x1, u[0], y[0], mask[0], complete)
        g1 = gammas[0].astype(dtype)
        tau1 = jax.tree_util.tree_map(lambda a, s: (1 - g1) * s + g1 * a, s1, S_prev)

        def block(carry, inp):
            params, x, lw, logZ, tau, nfl = carry
            y_b, u_b, m_b, v_b, g_b, t_b = inp
            ss, _ = bind(model, params, **kwargs)

            def step(c, s_in):
                x_prev, lw_prev, logZ, tau = c
                y_t, u_t, m_t, ok, g, t = s_in
                k = jax.random.fold_in(k_run, t)
                k_res, k_mov, k_back = jax.random.split(k, 3)
                xn, lwn, anc, lz, _, _ = filter_step(
                    ss,
                    resampling,
                    thr,
                    k_res,
                    k_mov,
                    x_prev,
                    lw_prev,
                    ~jnp.isfinite(logZ),
                    u_t,
                    y_t,
                    m_t,
                )
                taun, _ = paris_update(
                    kernel,
                    k_back,
                    ss,
                    x_prev,
                    lw_prev,
                    tau,
                    xn,
                    anc,
                    u_t,
                    y_t,
                    m_t,
                    1 - g,
                    g,
                    complete,
                )
                new = (xn, lwn, logZ + lz, taun)
                out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, c)
                return out, jnp.where(ok, lz, 0.0)

            (x, lw, logZ, tau), lzs = jax.lax.scan(step, (x, lw, logZ, tau), inp)
            n_valid = jnp.sum(v_b)
            n_end = n0 + 1 + jnp.max(jnp.where(v_b, t_b, 0))  # global 1-based step
            S = weighted_sum(tau, lw)
            do = (n_valid > 0) & (n_end > burn_in)
            new, floors = m_step.update(S, ss, free)
            new = {k: jnp.where(do, new[k], params[k]) for k in updated}
            d_old, d_new = _flat(params, updated), _flat(new, updated)
            change = jnp.linalg.norm(d_new - d_old) / jnp.maximum(jnp.linalg.norm(d_old), 1.0)
            params = {**params, **new}
            nfl = {k: nfl[k] + (do & (v > 0)).astype(jnp.int32) for k, v in floors.items()}
            rec = dict(
                step=n_end,
                lp=jnp.sum(lzs) / jnp.maximum(n_valid, 1),
                dtheta=jnp.where(do, change, 0.0),
                upd=do,
                traj={k: params[k] for k in updated},
            )
            return (params, x, lw, logZ, tau, nfl), rec

        st = ss0.structure
        nfl0 = {
            r.noise: jnp.zeros((), jnp.int32) for r in (st.dynamics, st.emission) if r.noise in free
        }
        carry0 = (params, x1, lw1, lz1, tau1, nfl0)
        (params, x, lw, logZ, tau, nfl), rec = jax.lax.scan(
            block, carry0, (ys, us, ms, valid, gs, tt)
        )
        rec["log_marginal"] = logZ
        rec["floors"] = nfl
        return params, weighted_sum(tau, lw), rec

    return jit_model(one_pass)


__all__ = ["OnlineEM", "OnlineEMMonitor", "OnlineEMResult"]
