"""Rolling-origin (leave-future-out) evaluation of a fitted model, in one call.

From every origin ``t`` the filter's ``p(x_t | y_{1:t})`` (Kalman for linear-Gaussian
models, proved from the model; a Gaussian E-step when given; a bootstrap particle filter
otherwise) is propagated ``k`` steps with the model's own noise, and observations are
drawn from its own emission distribution. Each forecast of ``y_{t+k}`` uses ``y_{1:t}``
only, so evaluating the origins after the training span is an out-of-sample test of the
fitted parameters (they are not refitted per origin).

Point forecasts: the predictive mean (the average of the emission means over the
paths), the median and the ``level`` interval (quantiles of the simulated observations).
Scores per horizon over the observed targets: RMSE and MAE of the mean, MAE of the
median, CRPS (the energy form ``E|Y - y| - E|Y - Y'| / 2`` of the simulated
observations, per output, averaged) and the interval's coverage.

The forecasting program is compiled once per model, filter, static arguments, horizons
and sizes, and cached: a second backtest with new parameters or new data of the same
shapes only runs it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import resampling as bj_resampling

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._run import prepare_eager, split_static, static_items, validate_data
from ppl_dyn.infer.particle import particle_filter
from ppl_dyn.requirements import UnsupportedModelError, linear_gaussian_form
from ppl_dyn.state_space import bind

__all__ = ["Backtest", "backtest", "crps_samples"]


class Backtest(NamedTuple):
    """Result of :func:`backtest`.

    Attributes:
        horizons: the steps ahead ``k``.
        origins: the 0-based origins ``t`` (the forecast of ``y_{t+k}`` uses
            ``y_{1:t+1}`` in 0-based slicing, i.e. ``y[: t + 1]``).
        mean, median, lower, upper: per horizon, ``(len(origins), obs_dim)`` forecasts
            of ``y[t + k]`` (a leading sequence axis when ``y`` had one); NaN where
            ``t + k`` is past the end.
        crps: per horizon, the CRPS of each forecast (same shape; NaN where the target
            is missing or past the end).
        scores: per horizon ``{"rmse", "mae", "mae_median", "crps", "coverage", "n"}``
            over the observed targets (``n`` of them).
        level: the interval's probability.
        filter: ``"kalman"``, ``"particle"`` or the Gaussian E-step's class name.
    """

    horizons: tuple
    origins: np.ndarray
    mean: dict
    median: dict
    lower: dict
    upper: dict
    crps: dict
    scores: dict
    level: float
    filter: str

    def table(self) -> str:
        """The scores as a Markdown table, one row per horizon."""
        rows = [
            "| horizon | RMSE | MAE | MAE (median) | CRPS | coverage | n |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in self.horizons:
            s = self.scores[k]
            rows.append(
                f"| {k} | {s['rmse']:.4g} | {s['mae']:.4g} | {s['mae_median']:.4g} | "
                f"{s['crps']:.4g} | {s['coverage']:.3f} | {s['n']} |"
            )
        return "\n".join(rows)


def crps_samples(samples, y):
    """CRPS of the empirical distribution of ``samples`` (axis 0, ``N`` draws) at ``y``:
    ``mean|X - y| - sum_ij |X_i - X_j| / (2 N^2)``, the pair sum from the sorted draws
    (``sum_ij |X_i - X_j| = 2 sum_i (2 i - N - 1) X_(i)``, 1-based ``i``): O(N log N)."""
    x = jnp.sort(samples, axis=0)
    n = x.shape[0]
    w = (2.0 * jnp.arange(1, n + 1) - n - 1).reshape((n,) + (1,) * (x.ndim - 1))
    return jnp.mean(jnp.abs(x - y), axis=0) - jnp.sum(w * x, axis=0) / n**2


def backtest(
    params: dict,
    model,
    *,
    y,
    rng_key,
    horizons: Sequence[int] = (1, 5, 10),
    start: int = 0,
    level: float = 0.9,
    num_paths: int = 1000,
    num_particles: int = 1000,
    e_step=None,
    **model_kwargs,
) -> Backtest:
    """Forecast ``y[t + k]`` from ``y[: t + 1]`` for every origin ``t >= start`` and
    horizon ``k`` with the model at ``params``, and score the forecasts (see the module
    docstring).

    Args:
        params: the fitted parameter values (e.g. ``EMResult.params``).
        model: the model function.
        y, **model_kwargs: the whole series (training span and held-out tail) and the
            model's other arguments (inputs ``u`` cover the whole series).
        rng_key: PRNG key (required).
        horizons: the steps ahead ``k``.
        start: the first origin (0-based); e.g. the length of the training span minus
            one, to score only forecasts made after it.
        level: the central interval's probability (``lower``/``upper``, coverage).
        num_paths: simulated paths per origin.
        num_particles: particles of the bootstrap filter (models that are not
            linear-Gaussian, without ``e_step``).
        e_step: a Gaussian E-step whose filtered moments to start from
            (``ExtendedKalmanSmoother()``); None picks the Kalman filter for
            linear-Gaussian models and the bootstrap particle filter otherwise.

    Example:
        >>> bt = ppl_dyn.backtest(res.params, lds, y=y, state_dim=2, start=79,
        ...                       rng_key=jax.random.key(0))         # doctest: +SKIP
        >>> print(bt.table())                                          # doctest: +SKIP
    """
    from ppl_dyn.infer.kalman import KalmanSmoother

    check_rng_key(rng_key)
    horizons = tuple(sorted({int(k) for k in horizons}))
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be positive ints; got {horizons}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    for name, v in (("num_paths", num_paths), ("num_particles", num_particles)):
        if not isinstance(v, (int, np.integer)) or v < 2:
            raise ValueError(f"{name} must be an int >= 2; got {v!r}")
    kwargs = validate_data(dict(model_kwargs, y=y))
    ss, spec = prepare_eager(model, params, (), kwargs)
    T = spec.y.shape[-2]
    if not 0 <= int(start) < T - horizons[0]:
        raise ValueError(
            f"start must be in [0, {T - horizons[0] - 1}] (an origin with a target "
            f"{horizons[0]} steps later in y of length {T}); got {start}"
        )
    if e_step is None:
        try:
            linear_gaussian_form(ss, dtype=spec.y.dtype)
            e_step = KalmanSmoother()
        except UnsupportedModelError:
            e_step = None
    if e_step is not None and (
        not callable(getattr(e_step, "posterior", None))
        or getattr(e_step, "deterministic", True) is False
    ):
        raise ValueError(
            f"e_step must be a Gaussian E-step (KalmanSmoother(), ExtendedKalmanSmoother()) "
            f"or None for the particle filter; got {e_step!r}"
        )
    name = "particle" if e_step is None else (
        "kalman" if type(e_step).__name__ == "KalmanSmoother" else type(e_step).__name__
    )  # fmt: skip
    dynamic, static = split_static(kwargs)
    config = (horizons, float(level), int(num_paths), int(num_particles))
    args = (model, e_step, static_items(static), config)
    fn = cached_program(("forecaster",) + args, lambda: _make_forecaster(*args))
    free = {k: v for k, v in params.items()}
    # (S, K', T, dy) each, K' the horizons; targets and scores on the host
    mean, median, lower, upper, crps = (np.asarray(a) for a in fn(rng_key, free, dynamic))
    yy = np.asarray(spec.y, float)
    origins = np.arange(int(start), T)
    out = {"mean": {}, "median": {}, "lower": {}, "upper": {}, "crps": {}}
    scores = {}
    for i, k in enumerate(horizons):
        target = np.full_like(yy, np.nan)
        target[:, : T - k] = yy[:, k:]
        sl = (slice(None), i, origins)
        m, md, lo, hi = mean[sl], median[sl], lower[sl], upper[sl]
        tg = target[:, origins]
        c = crps[sl]
        past = origins + k >= T
        for a in (m, md, lo, hi, c):
            a[:, past] = np.nan
        seen = np.isfinite(tg)
        n = int(seen.sum())
        err, err_md = (m - tg)[seen], (md - tg)[seen]
        scores[k] = {
            "rmse": float(np.sqrt(np.mean(err**2))) if n else float("nan"),
            "mae": float(np.mean(np.abs(err))) if n else float("nan"),
            "mae_median": float(np.mean(np.abs(err_md))) if n else float("nan"),
            "crps": float(np.mean(c[seen])) if n else float("nan"),
            "coverage": float(np.mean((tg >= lo)[seen] & (tg <= hi)[seen])) if n else float("nan"),
            "n": n,
        }
        for key, a in (("mean", m), ("median", md), ("lower", lo), ("upper", hi), ("crps", c)):
            out[key][k] = a if spec.batched else a[0]
    return Backtest(
        horizons, origins, out["mean"], out["median"], out["lower"], out["upper"],
        out["crps"], scores, float(level), name,
    )  # fmt: skip


def _make_forecaster(model, e_step, static_items, config):
    """The compiled forecasting program: ``(key, params, dynamic) -> mean, median,
    lower, upper, crps``, each ``(S, K', T, dy)`` for the origins ``t`` of every
    sequence and the horizons ``K'``; the CRPS against ``y[t + k]`` (NaN past the end
    or where ``y`` is missing)."""
    horizons, level, num_paths, num_particles = config
    static = dict(static_items)
    K = max(horizons)
    q = jnp.array([0.5, (1.0 - level) / 2.0, (1.0 + level) / 2.0])

    def paths(key, params, dynamic):
        ss, spec = bind(model, params, **static, **dynamic)
        y_all, u_all = spec.y, spec.u
        k_f, k_p = jax.random.split(key)
        post = None if e_step is None else e_step.posterior(k_f, ss, y_all, u_all)

        def one(key_s, y_s, u_s, s):
            k_pf, k_s, k_run = jax.random.split(key_s, 3)
            T = y_s.shape[0]
            if post is None:
                filt = particle_filter(k_pf, ss, y_s, u_s, num_particles)
                w = jnp.exp(filt.log_weights)  # (T, N)
                idx = jax.vmap(lambda kk, ww: bj_resampling.systematic(kk, ww, num_paths))(
                    jax.random.split(k_s, T), w
                )
                x = jnp.take_along_axis(filt.particles, idx[..., None], axis=1)
            else:
                m = post.filtered_means[s]
                L = la.cholesky(la.sym(post.filtered_covs[s]))
                z = jax.random.normal(k_s, (T, num_paths, m.shape[-1]), m.dtype)
                x = m[:, None, :] + jnp.einsum("tij,tnj->tni", L, z)
            t_idx = jnp.arange(T)
            keys = jax.random.split(k_run, 2 * K)
            emis, draws = [], []
            for k in range(1, K + 1):
                uk = u_s[jnp.minimum(t_idx + k, T - 1)][:, None, :]
                x = ss.transition(x, uk).sample(keys[2 * k - 2])
                if k in horizons:
                    em = ss.emission(x, uk)
                    emis.append(jnp.mean(em.mean, axis=1))  # (T, dy)
                    draws.append(em.sample(keys[2 * k - 1]))  # (T, N, dy)
            return jnp.stack(emis), jnp.stack(draws), y_s

        S = y_all.shape[0]
        return jax.vmap(one)(jax.random.split(k_p, S), y_all, u_all, jnp.arange(S))

    def run(key, params, dynamic):
        means, draws, y_all = paths(key, params, dynamic)  # draws: (S, K', T, N, dy)
        qs = jnp.quantile(draws, q, axis=3)  # (3, S, K', T, dy)
        rows = []
        for i, k in enumerate(horizons):
            # the target of the forecast from t: y[t + k] (NaN past the end)
            target = jnp.concatenate([y_all[:, k:], jnp.full_like(y_all[:, :k], jnp.nan)], 1)
            c = crps_samples(jnp.moveaxis(draws[:, i], 2, 0), target)  # (S, T, dy)
            rows.append(jnp.where(jnp.isnan(target), jnp.nan, c))
        return means, qs[0], qs[1], qs[2], jnp.stack(rows, axis=1)

    return jit_model(run, e_step)
