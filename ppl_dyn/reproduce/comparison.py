r"""Issue 6, part 5: EM-trained stochastic models against BPTT-trained networks.

Five models on two series, scored on held-out data by the same protocol:

============== ========================================================================
``lds_em``     linear dynamical system, EM with the exact Kalman smoother (start from
               factor analysis)
``tanh_rnn``   noisy tanh-RNN (seed 000) by particle EM (start of the seed's 4.3)
``rbf_eks``    RBF dynamics by EM with the extended Kalman smoother
               (:func:`~ppl_dyn.infer.fit_nested`: factor analysis -> LDS -> RBF)
``rnn_bptt``   deterministic tanh-RNN trained by BPTT (:mod:`ppl_dyn.baselines`)
``lstm_bptt``  deterministic LSTM trained by BPTT
============== ========================================================================

Data: (a) ``synthetic``: the seed-000 two-neuron oscillator (the system of
:mod:`ppl_dyn.reproduce.unkelbach`, simulated with NumPy): 1000 training steps, a fresh
2000-step test sequence; (b) ``sunspots``: yearly 1700-2008, standardised with the training
part's mean and standard deviation, training on 1700-1949, testing on 1950-2008.

Protocol (identical for every model). Each model reads an *evaluation sequence*
``y_{1:T}`` (synthetic: the test sequence; sunspots: the whole series, so the training
years are the warm-up) and, for every origin ``t``, forecasts ``y_{t+k}`` from
``y_{1:t}`` only: that is the information set of every model. The scored *targets* are
``y_s`` for ``s`` in the test window (synthetic: ``s >= 10``, so that every horizon
scores the same targets; sunspots: the 59 test years); the forecast of ``y_s`` at
horizon ``k`` comes from origin ``s - k``.

* Probabilistic models: the filter gives ``p(x_t | y_{1:t})`` (exact Kalman filter for
  the LDS; a bootstrap particle filter with ``num_particles`` particles for the
  tanh-RNN and the RBF model, i.e. the fitted generative model itself rather than its
  EKF approximation); the k-step predictive ``p(y_{t+k} | y_{1:t})`` follows by
  propagating with the model's noise (closed form for the LDS; simulated particles
  otherwise). The point forecast is the predictive mean, the interval its central
  90 % (Gaussian quantiles for the LDS; particle quantiles otherwise), and the held-out
  log-likelihood is ``sum_s log p(y_s | y_{1:s-1})`` over the test targets (reported
  per step; particle models: the log of the Monte Carlo average of ``p(y_s | x)`` over
  the propagated particles). For the RBF model the EKF's own one-step log-likelihood is
  reported as well.
* Deterministic networks: :func:`ppl_dyn.baselines.predict` (teacher-forced on
  ``y_{1:t}`` from a zero state, then closed loop); no log-likelihood or interval.

Fit time is the wall time of the fit call, compilation included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

HORIZONS = (1, 5, 10)
LEVEL = 0.9
MODELS = {
    "lds_em": "LDS, EM (Kalman)",
    "tanh_rnn": "noisy tanh-RNN, particle EM",
    "rbf_eks": "RBF, EM (EKS)",
    "rnn_bptt": "tanh-RNN, BPTT",
    "lstm_bptt": "LSTM, BPTT",
}
PROBABILISTIC = ("lds_em", "tanh_rnn", "rbf_eks")
REFERENCE = {"true_system": "true system (reference)"}


# --------------------------------------------------------------------------------------
# predictive distributions
# --------------------------------------------------------------------------------------


class Forecasts(NamedTuple):
    """Forecasts along one sequence ``y`` ``(T, dy)``.

    Attributes:
        mean: ``mean[k][t]`` forecasts ``y_{t+k}`` from ``y_{1:t}`` (0-based ``t``;
            rows with ``t + k >= T`` lie beyond the data), ``(T, dy)`` per horizon.
        lower, upper: the central ``level`` interval of ``p(y_{t+k} | y_{1:t})``, same
            layout (None for deterministic forecasts).
        log_pred: ``log_pred[t] = log p(y_t | y_{1:t-1})`` ``(T,)`` (None for
            deterministic forecasts; entry 0 is NaN for particle forecasts).
        level: central probability of the interval.
    """

    mean: dict
    lower: Optional[dict]
    upper: Optional[dict]
    log_pred: Optional[np.ndarray]
    level: float


def gaussian_interval(mean, var, level: float = LEVEL):
    """Central ``level`` interval of ``N(mean, var)`` (element-wise)."""
    from scipy.stats import norm

    z = norm.ppf(0.5 + level / 2)
    sd = np.sqrt(np.asarray(var, dtype=float))
    mean = np.asarray(mean, dtype=float)
    return mean - z * sd, mean + z * sd


def kalman_forecasts(
    params: dict,
    model,
    *,
    y,
    horizons: Sequence[int] = HORIZONS,
    level: float = LEVEL,
    **model_kwargs,
) -> Forecasts:
    r"""Exact k-step predictive distributions of a linear-Gaussian model without inputs.

    From the Kalman filter's ``N(m_t, P_t)`` for ``p(x_t | y_{1:t})``, ``k`` steps of
    ``m <- F m + c``, ``P <- F P F^T + Q`` give ``p(y_{t+k} | y_{1:t}) = N(H m + e,
    H P H^T + R)``; ``log_pred[t+1]`` is the log-density of ``y_{t+1}`` under that
    one-step predictive (``log_pred[0]`` under ``N(H m_0 + e, H P_0 H^T + R)``).
    """
    import jax.numpy as jnp

    from ppl_dyn.infer._compile import cached_program
    from ppl_dyn.infer._run import split_static, static_items, validate_data

    if model_kwargs.get("u") is not None:
        raise ValueError("kalman_forecasts supports models without inputs only")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    yy = np.asarray(y, dtype=float)
    if yy.ndim != 2:
        raise ValueError(f"pass one sequence y of shape (T, obs_dim); got shape {yy.shape}")
    kwargs = validate_data(dict(model_kwargs, y=yy))
    dynamic, static = split_static(kwargs)
    K = max(int(k) for k in horizons)
    args = (model, static_items(static), K)
    kernel = cached_program(("kalman_forecast",) + args, lambda: _make_kalman_kernel(*args))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    ym, S, first_mean, first_cov = (np.asarray(a) for a in kernel(params, dynamic))
    mean, lower, upper = {}, {}, {}
    for k in range(1, K + 1):
        var = np.diagonal(S[k - 1], axis1=-2, axis2=-1)
        mean[k] = ym[k - 1]
        lower[k], upper[k] = gaussian_interval(ym[k - 1], var, level)
    T, dy = yy.shape
    pm = np.concatenate([first_mean[None], ym[0, :-1]], 0)  # (T, dy) one-step means
    pS = np.concatenate([first_cov[None], S[0, :-1]], 0)  # (T, dy, dy)
    L = np.linalg.cholesky(pS)
    z = np.linalg.solve(L, (yy - pm)[..., None])[..., 0]
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), -1)
    log_pred = -0.5 * (np.sum(z**2, -1) + logdet + dy * np.log(2 * np.pi))
    return Forecasts(mean, lower, upper, log_pred, float(level))


def _make_kalman_kernel(model, static_items, num_horizons: int):
    """Jitted ``(params, dynamic) -> (k-step means (K, T, dy), covariances (K, T, dy, dy),
    mean and covariance of y_1)``."""
    import jax
    import jax.numpy as jnp

    from ppl_dyn.infer.kalman import kalman_filter, linear_gaussian_view
    from ppl_dyn.state_space import bind

    static = dict(static_items)

    def run(params, dynamic):
        ss, spec = bind(model, params, **static, **dynamic)
        view = linear_gaussian_view(ss, spec.u[0])
        _, _, m_f, P_f, _ = kalman_filter(view, spec.y[0])
        F, Q, H, R = view.F, view.Q, view.H, view.R
        c, e = view.c[-1], view.e[-1]

        def step(carry, _):
            m, P = carry
            m = m @ F.T + c
            P = jnp.einsum("ij,tjk,lk->til", F, P, F) + Q
            S = jnp.einsum("ij,tjk,lk->til", H, P, H) + R
            return (m, P), (m @ H.T + e, S)

        _, (ym, S) = jax.lax.scan(step, (m_f, P_f), None, length=num_horizons)
        return ym, S, H @ view.m0 + view.e[0], H @ view.P0 @ H.T + R

    return jax.jit(run)


def particle_forecasts(
    rng_key,
    params: dict,
    model,
    *,
    y,
    horizons: Sequence[int] = HORIZONS,
    level: float = LEVEL,
    num_particles: int = 1000,
    **model_kwargs,
) -> Forecasts:
    """k-step predictive distributions of any model from a bootstrap particle filter.

    At every ``t`` the filter particles (resampled systematically to equal weights)
    represent ``p(x_t | y_{1:t})``; each is propagated ``k`` steps through the model's
    transition with its noise and an observation drawn from the emission. The mean is
    the average emission mean, the interval the particle quantiles of the simulated
    observations, and ``log_pred[t+1] = log (1/N) sum_i p(y_{t+1} | x^i_{t+1})`` over the
    one-step particles (``log_pred[0]`` is NaN). The same forecasts as
    :func:`ppl_dyn.predict` with ``method="particles"``, at any interval level.
    """
    import jax.numpy as jnp

    from ppl_dyn._validation import check_rng_key
    from ppl_dyn.infer._compile import cached_program
    from ppl_dyn.infer._run import split_static, static_items, validate_data

    check_rng_key(rng_key)
    if np.ndim(y) != 2:
        raise ValueError(f"pass one sequence y of shape (T, obs_dim); got shape {np.shape(y)}")
    kwargs = validate_data(dict(model_kwargs, y=y))
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    K = max(int(k) for k in horizons)
    dynamic, static = split_static(kwargs)
    args = (model, static_items(static), int(num_particles), K, float(level))
    kernel = cached_program(("particle_forecast",) + args, lambda: _make_particle_kernel(*args))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    means, bands, lp = (np.asarray(a) for a in kernel(rng_key, params, dynamic))
    mean = {k: means[k - 1] for k in range(1, K + 1)}
    lower = {k: bands[k - 1, 0] for k in range(1, K + 1)}
    upper = {k: bands[k - 1, 1] for k in range(1, K + 1)}
    log_pred = np.concatenate([[np.nan], lp[:-1]])
    return Forecasts(mean, lower, upper, log_pred, float(level))


def _make_particle_kernel(model, static_items, num_particles: int, num_horizons: int, level: float):
    """Jitted particle forecaster ``(rng_key, params, dynamic) -> (means, bands, log_pred)``
    for one model and its static arguments (compiled once per data shape)."""
    import jax
    import jax.numpy as jnp
    from blackjax.smc import resampling as bj_resampling

    from ppl_dyn.infer.particle import emission_log_lik, particle_filter
    from ppl_dyn.state_space import bind

    static = dict(static_items)
    N, K = num_particles, num_horizons

    def run(key, params, dynamic):
        ss, spec = bind(model, params, **static, **dynamic)
        y_s, u_s = spec.y[0], spec.u[0]
        T = y_s.shape[0]
        probs = jnp.asarray([0.5 - level / 2, 0.5 + level / 2], y_s.dtype)
        k_f, k_r, k_p = jax.random.split(key, 3)
        filt = particle_filter(k_f, ss, y_s, u_s, N)
        w = jnp.exp(filt.log_weights)
        idx = jax.vmap(lambda kk, ww: bj_resampling.systematic(kk, ww, N))(
            jax.random.split(k_r, T), w
        )
        x = jnp.take_along_axis(filt.particles, idx[..., None], axis=1)  # (T, N, dx)
        t_idx = jnp.arange(T)

        def step(x, inp):
            k, key_k = inp
            uk = u_s[jnp.minimum(t_idx + k, T - 1)][:, None, :]
            k1, k2 = jax.random.split(key_k)
            x = ss.transition(x, uk).sample(k1)
            em = ss.emission(x, uk)
            ysim = em.sample(k2)
            return x, (jnp.mean(em.mean, axis=1), jnp.quantile(ysim, probs, axis=1))

        # the one-step particles x_{t+1} ~ p(x_{t+1} | y_{1:t}), kept for the density
        k1, k2 = jax.random.split(k_p)
        x1 = ss.transition(x, u_s[jnp.minimum(t_idx + 1, T - 1)][:, None, :]).sample(k1)
        _, (means, bands) = jax.lax.scan(step, x, (jnp.arange(1, K + 1), jax.random.split(k2, K)))
        y_next = jnp.concatenate([y_s[1:], jnp.full_like(y_s[:1], jnp.nan)], 0)
        u_next = jnp.concatenate([u_s[1:], u_s[-1:]], 0)
        lik = jax.vmap(lambda xt, ut, yt: emission_log_lik(ss, xt, ut, yt, ~jnp.isnan(yt)))(
            x1, u_next, y_next
        )  # (T, N)
        lp = jax.scipy.special.logsumexp(lik, axis=1) - jnp.log(N)
        return means, bands, lp

    return jax.jit(run)


def network_forecasts(
    params: dict, baseline, *, y, horizons: Sequence[int] = HORIZONS
) -> Forecasts:
    """Deterministic forecasts of a BPTT network (:func:`ppl_dyn.baselines.predict`)."""
    from ppl_dyn import baselines

    K = max(int(k) for k in horizons)
    pred = baselines.predict(params, baseline, y=y, horizons=tuple(range(1, K + 1)))
    return Forecasts({k: np.asarray(v) for k, v in pred.mean.items()}, None, None, None, LEVEL)


# --------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------


def interval_coverage(y, lower, upper) -> float:
    """Fraction of observations with ``lower <= y <= upper`` (all entries pooled)."""
    y, lower, upper = (np.asarray(a, dtype=float) for a in (y, lower, upper))
    return float(np.mean((y >= lower) & (y <= upper)))


def score(fc: Forecasts, y, start: int, horizons: Sequence[int] = HORIZONS) -> dict:
    """Scores over the targets ``y_s``, ``s = start .. T-1`` (0-based).

    Returns ``rmse_k`` for every horizon in ``1 .. max(horizons)`` (the forecast of
    ``y_s`` comes from origin ``s - k``), ``coverage_k`` for ``k`` in ``horizons`` and
    ``loglik_per_step`` / ``loglik_sum`` (sum of ``log p(y_s | y_{1:s-1})``) when the
    forecasts are probabilistic.
    """
    y = np.asarray(y, dtype=float)
    T = y.shape[0]
    K = max(int(k) for k in horizons)
    if not K <= start < T:
        raise ValueError(
            f"start must lie in [{K}, {T}) so that every horizon has an origin; got {start}"
        )
    target = y[start:]
    out = {}
    for k in range(1, K + 1):
        err = np.asarray(fc.mean[k])[start - k : T - k] - target
        out[f"rmse_{k}"] = float(np.sqrt(np.mean(err**2)))
    if fc.lower is not None:
        for k in horizons:
            lo = np.asarray(fc.lower[k])[start - k : T - k]
            hi = np.asarray(fc.upper[k])[start - k : T - k]
            out[f"coverage_{k}"] = interval_coverage(target, lo, hi)
    if fc.log_pred is not None:
        lp = np.asarray(fc.log_pred)[start:]
        out["loglik_sum"] = float(np.sum(lp))
        out["loglik_per_step"] = float(np.mean(lp))
    return out


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


class Task(NamedTuple):
    name: str
    y_train: np.ndarray
    y_eval: np.ndarray  # the sequence every model forecasts along
    start: int  # first scored target in y_eval
    description: str


def simulate_oscillator(rng: np.random.Generator, num_steps: int) -> np.ndarray:
    """One sequence ``(num_steps, 1)`` of the seed-000 system: ``x_1 ~ N(0, 0.001 I)``,
    ``x_t = A tanh(x_{t-1}) + w_t``, ``y_t = (1 0) tanh(x_t) + v_t``, ``w ~ N(0, 0.001 I)``,
    ``v ~ N(0, 0.01)`` (the parameters of :func:`ppl_dyn.reproduce.unkelbach.true_params`)."""
    from ppl_dyn.reproduce.unkelbach import true_params

    p = {k: np.asarray(v) for k, v in true_params().items()}
    x = rng.multivariate_normal(p["m0"], p["P0"])
    L = np.linalg.cholesky(p["Q"])
    ys = np.empty((num_steps, 1))
    for t in range(num_steps):
        if t:
            x = p["A"] @ np.tanh(x) + L @ rng.standard_normal(2)
        ys[t] = p["C"] @ np.tanh(x) + np.sqrt(p["R"][0, 0]) * rng.standard_normal()
    return ys


def synthetic_task(seed: int, num_train: int = 1000, num_test: int = 2000) -> Task:
    """Seed-000 data: a training sequence and an independent (fresh) test sequence."""
    rng = np.random.default_rng(seed)
    y_tr = simulate_oscillator(rng, num_train)
    y_te = simulate_oscillator(rng, num_test)
    return Task(
        "synthetic",
        y_tr,
        y_te,
        max(HORIZONS),
        f"seed-000 oscillator: train {num_train} steps, fresh test sequence of "
        f"{num_test} steps (targets from step {max(HORIZONS)})",
    )


def sunspots_task(split: int = 250) -> Task:
    """Yearly sunspots, standardised with the training years' mean and sd."""
    from ppl_dyn.datasets import sunspots

    data = sunspots()
    raw = np.asarray(data.y, dtype=float)
    mu, sd = np.nanmean(raw[:split]), np.nanstd(raw[:split])
    y = (raw - mu) / sd
    t = data.time
    return Task(
        "sunspots",
        y[:split],
        y,
        split,
        f"yearly sunspots standardised (train mean {mu:.1f}, sd {sd:.1f}): train "
        f"{int(t[0])}-{int(t[split - 1])}, test {int(t[split])}-{int(t[-1])}",
    )


# --------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------


def _config(small: bool, num_particles: Optional[int], num_iters: Optional[int]) -> dict:
    cfg = dict(
        gauss_state_dim=2,
        hidden_dim=5,
        num_centres=5,
        lds_iters=100,
        nested_lds_iters=50,
        rbf_iters=20,
        pem_particles=100,
        pem_iters=100,
        bptt_steps=3000,
        bptt_lr=5e-3,
        washout=5,
        forecast_particles=1000,
        synthetic_train=1000,
        synthetic_test=2000,
        reference=True,
    )
    if small:
        cfg.update(
            lds_iters=10,
            nested_lds_iters=10,
            rbf_iters=3,
            pem_particles=30,
            gauss_state_dim=1,
            hidden_dim=2,
            num_centres=3,
            pem_iters=5,
            bptt_steps=100,
            forecast_particles=200,
            # the sunspots' shapes, so that compiled steps are reused
            synthetic_train=250,
            synthetic_test=309,
            reference=False,
        )
    if num_particles is not None:
        cfg["pem_particles"] = int(num_particles)
    if num_iters is not None:
        cfg["pem_iters"] = int(num_iters)
    return cfg


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - t0


def _print(msg: str) -> None:
    print(msg, flush=True)


def fit_and_forecast(task: Task, seed: int, cfg: dict, log=_print) -> dict:
    """Fit every model to ``task.y_train`` and score its forecasts along ``task.y_eval``.

    Returns ``{model: {"fit_seconds": ..., "forecasts": Forecasts, "scores": {...}}}``.
    """
    import jax.numpy as jnp
    from jax import random

    from ppl_dyn import baselines
    from ppl_dyn.infer import (
        EM,
        ExtendedKalmanSmoother,
        KalmanSmoother,
        ParticleSmoother,
        factor_analysis_init,
        fit_nested,
    )
    from ppl_dyn.models import lds, rbf, tanh_rnn

    keys = dict(
        zip(
            ("lds", "pem", "pem_init", "rbf", "rnn", "lstm", "pf"),
            random.split(random.key(1000 + seed), 7),
            strict=True,
        )
    )
    y_tr, y_ev = task.y_train, task.y_eval
    dg, H = cfg["gauss_state_dim"], cfg["hidden_dim"]
    bias = True  # offsets b, d in every model (the networks have them too)
    out = {}

    def record(name, fit_seconds, fc, extra=None):
        sc = score(fc, y_ev, task.start)
        if extra:
            sc.update(extra)
        out[name] = dict(fit_seconds=fit_seconds, forecasts=fc, scores=sc)
        msg = " ".join(f"{k}={sc[f'rmse_{k}']:.3f}" for k in HORIZONS)
        if "loglik_per_step" in sc:
            msg += f" loglik/step={sc['loglik_per_step']:.3f} cov90(1)={sc['coverage_1']:.2f}"
        fs = "-" if fit_seconds is None else f"{fit_seconds:.1f} s"
        log(f"  [{task.name} seed {seed}] {name:11s} fit {fs:>8s}  RMSE {msg}")

    # LDS by EM with the Kalman smoother, from factor analysis
    kw_l = dict(state_dim=dg, bias=bias)
    init = factor_analysis_init(y_tr, state_dim=dg)
    res, secs = _timed(
        lambda: EM(lds, KalmanSmoother()).run(
            keys["lds"], cfg["lds_iters"], init=init, y=y_tr, progress_bar=False, **kw_l
        )
    )
    record("lds_em", secs, kalman_forecasts(res.params, lds, y=y_ev, **kw_l))

    # noisy tanh-RNN by particle EM (initialisation of the seed's 4.3)
    ka, kc = random.split(keys["pem_init"])
    init = dict(
        A=jnp.eye(H) + 0.1 * random.normal(ka, (H, H)),
        C=1.0 + 0.1 * random.normal(kc, (1, H)),
        Q=0.01 * jnp.eye(H),
        R=jnp.var(jnp.asarray(y_tr)) * jnp.eye(1),
        m0=jnp.zeros(H),
        P0=0.01 * jnp.eye(H),
    )
    init.update(b=jnp.zeros(H), d=jnp.zeros(1))
    kw_t = dict(state_dim=H, bias=bias)
    res, secs = _timed(
        lambda: EM(tanh_rnn, ParticleSmoother(num_particles=cfg["pem_particles"])).run(
            keys["pem"], cfg["pem_iters"], y=y_tr, init_params=init, progress_bar=False, **kw_t
        )
    )
    record(
        "tanh_rnn",
        secs,
        particle_forecasts(
            keys["pf"],
            res.params,
            tanh_rnn,
            y=y_ev,
            num_particles=cfg["forecast_particles"],
            **kw_t,
        ),
    )

    # RBF model: factor analysis -> LDS -> RBF by EM with the EKS
    nest, secs = _timed(
        lambda: fit_nested(
            keys["rbf"],
            y=y_tr,
            state_dim=dg,
            num_centres=cfg["num_centres"],
            lds_iters=cfg["nested_lds_iters"],
            rbf_iters=cfg["rbf_iters"],
            progress_bar=False,
        )
    )
    kw_r = dict(state_dim=dg, centres=nest.centres, widths=nest.widths)
    fc = particle_forecasts(
        keys["pf"], nest.rbf.params, rbf, y=y_ev, num_particles=cfg["forecast_particles"], **kw_r
    )
    ekf = ExtendedKalmanSmoother().smooth(nest.rbf.params, rbf, y=y_ev, **kw_r)
    ekf_lp = np.asarray(ekf.predicted_log_probs)[task.start :]
    record("rbf_eks", secs, fc, {"loglik_per_step_ekf": float(np.mean(ekf_lp))})

    # deterministic networks by BPTT
    for name, cell in (("rnn_bptt", "tanh"), ("lstm_bptt", "lstm")):
        net = baselines.Baseline(cell, H)
        key = keys["rnn" if cell == "tanh" else "lstm"]
        fit, secs = _timed(
            lambda net=net, key=key: baselines.fit_bptt(
                key,
                net,
                y=y_tr,
                num_steps=cfg["bptt_steps"],
                learning_rate=cfg["bptt_lr"],
                clip_norm=1.0,
                washout=cfg["washout"],
                progress_bar=False,
            )
        )
        record(name, secs, network_forecasts(fit.params, net, y=y_ev))

    if task.name == "synthetic" and cfg["reference"]:  # the true system, same protocol
        from ppl_dyn.reproduce.unkelbach import true_params

        record(
            "true_system",
            None,
            particle_forecasts(
                keys["pf"],
                true_params(),
                tanh_rnn,
                y=y_ev,
                state_dim=2,
                bias=False,
                num_particles=cfg["forecast_particles"],
            ),
        )
    return out


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

_TABLE_METRICS = (
    "rmse_1",
    "rmse_5",
    "rmse_10",
    "fit_seconds",
    "loglik_per_step",
    "coverage_1",
    "coverage_5",
    "coverage_10",
)


def _summarise(runs: list) -> dict:
    """Median over seeds of every metric, per model; per-seed values kept."""
    table = {}
    for name in list(MODELS) + list(REFERENCE):
        per_seed = [r[name] for r in runs if name in r]
        if not per_seed:
            continue
        rows = []
        for r in per_seed:
            row = dict(r["scores"])
            row["fit_seconds"] = r["fit_seconds"]
            rows.append(row)
        med = {}
        for key in rows[0]:
            vals = [row[key] for row in rows]
            med[key] = None if any(v is None for v in vals) else float(np.median(vals))
        med["label"] = {**MODELS, **REFERENCE}[name]
        med["probabilistic"] = name in PROBABILISTIC or name in REFERENCE
        med["per_seed"] = rows
        table[name] = med
    return table


_DIGITS = {"fit": 1, "coverage": 2}


def _fmt(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def markdown_table(metrics: dict) -> str:
    lines = []
    for ds, block in metrics["datasets"].items():
        lines.append(f"### {ds}\n\n{block['description']}; median over seeds {metrics['seeds']}.\n")
        lines.append(
            "| model | RMSE 1 | RMSE 5 | RMSE 10 | fit s | log-lik/step | "
            "90% cov. 1 | 90% cov. 5 | 90% cov. 10 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m in block["models"].values():
            cells = [_fmt(m.get(k), _DIGITS.get(k.split("_")[0], 3)) for k in _TABLE_METRICS]
            lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_COLORS = {
    "lds_em": "C0",
    "tanh_rnn": "C1",
    "rbf_eks": "C2",
    "rnn_bptt": "C3",
    "lstm_bptt": "C4",
    "true_system": "k",
}


def figures(out: Path, tasks: dict, first: dict, metrics: dict) -> None:
    """Forecasts with 90 % intervals on the test part (first seed), RMSE vs horizon."""
    from ppl_dyn.plots import _plt

    plt = _plt()
    colors = _COLORS
    for ds, task in tasks.items():
        runs = first[ds]
        names = [n for n in list(MODELS) + list(REFERENCE) if n in runs]
        y = task.y_eval[:, 0]
        s0 = task.start
        s1 = min(len(y), s0 + 200)
        s = np.arange(s0, s1)
        fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.9 * len(names)), sharex=True)
        for ax, name in zip(axes, names, strict=True):
            fc = runs[name]["forecasts"]
            for k, ls, alpha in ((1, "-", 0.3), (10, "--", 0.12)):
                mk = np.asarray(fc.mean[k])[s - k, 0]
                ax.plot(s, mk, ls, color=colors[name], lw=1.1, label=f"{k}-step mean")
                if fc.lower is not None:
                    ax.fill_between(
                        s,
                        np.asarray(fc.lower[k])[s - k, 0],
                        np.asarray(fc.upper[k])[s - k, 0],
                        color=colors[name],
                        alpha=alpha,
                        lw=0,
                        label=f"{k}-step 90% interval",
                    )
            ax.plot(s, y[s0:s1], ".", ms=3, color="0.2", label="held-out data")
            ax.set_ylabel(name, fontsize=8)
            ax.legend(loc="upper right", fontsize=6, ncol=5)
        axes[0].set_title(f"{ds}: forecasts of held-out data (seed {metrics['seeds'][0]})")
        axes[-1].set_xlabel("time index of the target in the evaluation sequence")
        fig.tight_layout()
        fig.savefig(out / f"forecasts_{ds}.png", dpi=100)
        plt.close(fig)

    plot_rmse_vs_horizon(out, metrics)


def plot_rmse_vs_horizon(out: Path, metrics: dict) -> None:
    """``out/rmse_vs_horizon.png`` from a ``metrics.json`` dictionary (log scale where
    the RMSEs span more than a factor of 10)."""
    from ppl_dyn.plots import _plt

    plt = _plt()
    blocks = metrics["datasets"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4), squeeze=False)
    ks = np.arange(1, max(metrics["horizons"]) + 1)
    for ax, (ds, block) in zip(axes[0], blocks.items(), strict=True):
        top = []
        for name, m in block["models"].items():
            vals = [m[f"rmse_{k}"] for k in ks]
            top.extend(vals)
            ax.plot(
                ks,
                vals,
                "o",
                ms=3,
                color=_COLORS.get(name),
                label=m["label"],
                ls="--" if name in REFERENCE else "-",
            )
        if max(top) > 10 * min(top):
            ax.set_yscale("log")
        ax.set_xlabel("forecast horizon k")
        ax.set_ylabel("RMSE on held-out targets")
        ax.set_title(f"{ds} (median over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rmse_vs_horizon.png", dpi=100)
    plt.close(fig)


def run(
    out_dir,
    *,
    small: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    datasets: Sequence[str] = ("synthetic", "sunspots"),
    num_particles: Optional[int] = None,
    num_iters: Optional[int] = None,
    make_figures: bool = True,
    log=None,
) -> dict:
    """Run the study; write ``metrics.json``, ``comparison.md`` and figures to ``out_dir``.

    Args:
        out_dir: output directory (created).
        small: tiny data and few iterations (a smoke test, well under a minute).
        seeds: seeds of the data (synthetic), initialisations and filters.
        datasets: any of ``"synthetic"``, ``"sunspots"``.
        num_particles, num_iters: particle-EM particles and iterations (defaults:
            100 and 100, small: 30 and 5).
        make_figures: write the PNG figures.
        log: progress printer.

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    log = _print if log is None else log
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    unknown = set(datasets) - {"synthetic", "sunspots"}
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}; use 'synthetic' and/or 'sunspots'")
    cfg = _config(small, num_particles, num_iters)
    t_all = time.perf_counter()
    metrics = dict(
        horizons=list(HORIZONS),
        level=LEVEL,
        seeds=seeds,
        small=bool(small),
        config=cfg,
        protocol=__doc__.split("Protocol (identical for every model).")[1]
        .split("Fit time")[0]
        .strip()
        .replace("\n", " "),
        datasets={},
    )
    tasks, first = {}, {}
    for ds in datasets:
        runs = []
        for s in seeds:
            if ds == "synthetic":
                task = synthetic_task(s, cfg["synthetic_train"], cfg["synthetic_test"])
            else:
                task = sunspots_task(split=250)
            log(f"{ds}, seed {s}: {task.description}")
            r = fit_and_forecast(task, s, cfg, log=log)
            runs.append(r)
            if s == seeds[0]:
                tasks[ds], first[ds] = task, r
        metrics["datasets"][ds] = dict(
            description=tasks[ds].description,
            num_train=int(tasks[ds].y_train.shape[0]),
            num_eval=int(tasks[ds].y_eval.shape[0]),
            first_target=int(tasks[ds].start),
            num_targets=int(tasks[ds].y_eval.shape[0] - tasks[ds].start),
            test_std=float(np.std(tasks[ds].y_eval[tasks[ds].start :])),
            models=_summarise(runs),
        )
    metrics["total_seconds"] = time.perf_counter() - t_all
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "comparison.md").write_text("# Comparison study\n\n" + markdown_table(metrics))
    if make_figures:
        figures(out, tasks, first, metrics)
    log(
        f"done in {metrics['total_seconds']:.0f} s: {out / 'metrics.json'}, "
        f"{out / 'comparison.md'}, figures in {out}"
    )
    return metrics


def main(
    out: Path,
    *,
    small: bool = False,
    num_seeds: int = 3,
    num_particles: Optional[int] = None,
    num_iters: Optional[int] = None,
) -> dict:
    """CLI entry (``ppl-dyn reproduce comparison``)."""
    return run(
        out,
        small=small,
        seeds=tuple(range(num_seeds)),
        num_particles=num_particles,
        num_iters=num_iters,
    )
