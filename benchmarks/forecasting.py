"""Forecasting study on real series: ppl_dyn's LDS, tanh-RNN and RBF fits against
classical baselines from statsmodels, on the same held-out windows.

Run from the repository root (needs the ``bench`` extra: statsmodels)::

    python benchmarks/forecasting.py [--quick] [--out benchmarks/forecasting_results.md]

For every series the last ``holdout`` points are held out. Every method is fitted once on
the rest, then forecasts ``y[t + k]`` from ``y[: t + 1]`` for every origin ``t`` from the
end of the fitted span on (rolling origin, parameters fixed), ``k`` = 1, 5, 10:

* ppl_dyn (data standardised with the fitted span's mean and scale): ``lds`` by MAP-EM
  with the Kalman smoother; ``tanh_rnn`` by MAP-EM with the extended Kalman smoother;
  ``rbf`` by ``fit_nested`` (MAP-EM, spectral radius of the linear part <= 0.99).
  Forecasts by :func:`ppl_dyn.backtest` (Kalman filter for the LDS, the EKS filter
  for the nonlinear models; 1,000 simulated paths per origin).
* statsmodels (SARIMAX / state-space exponential smoothing; forecasts from each origin by
  ``results.apply(y[: t + 1])``, Gaussian predictive laws): AR(p) with ``p`` by AIC
  (``ar_select_order``, at most 12 lags); ARIMA(p, d, q) by AIC over p <= 3, d <= 1,
  q <= 2; exponential smoothing with or without a damped trend by AIC (with a 12-month
  season for CO2).

Scores per horizon: RMSE of the predictive mean, CRPS (closed form for the Gaussian
baselines, from the simulated observations for ppl_dyn) and the coverage of the central
90 % interval, all in the units of the (transformed) series.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

HORIZONS = (1, 5, 10)
LEVEL = 0.9

#: name -> (transform, holdout, state_dim, what)
SERIES = {
    "nile": (None, 20, 1, "annual flow, a level shift"),
    "sunspots": (None, 40, 2, "yearly, an 11-year nonlinear cycle"),
    "lynx": ("log10", 20, 2, "log10 annual counts, a ~10-year nonlinear cycle"),
    "discoveries": (None, 20, 1, "yearly small counts"),
    "co2": ("monthly", 36, 3, "monthly means, trend and season"),
}


def load(name: str):
    from ppl_dyn import datasets

    d = datasets.load(name)
    y = np.asarray(d.y[:, 0], float)
    transform = SERIES[name][0]
    if transform == "log10":
        y = np.log10(y)
    if transform == "monthly":  # weekly -> calendar-month means (NaN weeks skipped)
        month = (np.floor(d.time * 12) - np.floor(d.time[0] * 12)).astype(int)
        y = np.array([np.nanmean(y[month == m]) if np.isfinite(y[month == m]).any()
                      else np.nan for m in range(month.max() + 1)])  # fmt: skip
        gap = np.isnan(y)  # months without any weekly value: linear interpolation
        y[gap] = np.interp(np.flatnonzero(gap), np.flatnonzero(~gap), y[~gap])
    return y


def gaussian_scores(mean, sd, target):
    z = (target - mean) / sd
    crps = sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    half = stats.norm.ppf(0.5 + LEVEL / 2) * sd
    return crps, (target >= mean - half) & (target <= mean + half)


def summarise(errors, crps, inside):
    return {
        k: {
            "rmse": float(np.sqrt(np.mean(np.square(errors[k])))),
            "crps": float(np.mean(crps[k])),
            "coverage": float(np.mean(inside[k])),
            "n": len(errors[k]),
        }
        for k in HORIZONS
    }


# -- statsmodels baselines ---------------------------------------------------------------
def baseline_fits(train, seasonal):
    from statsmodels.tsa.ar_model import ar_select_order
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    fits = {}
    sel = ar_select_order(train, maxlag=min(12, len(train) // 4), ic="aic", trend="c")
    p = max(sel.ar_lags) if sel.ar_lags else 0
    fits[f"AR({p}) (AIC)"] = SARIMAX(train, order=(p, 0, 0), trend="c").fit(disp=False)
    best = None
    for d in (0, 1):
        for p_ in range(4):
            for q in range(3):
                try:
                    r = SARIMAX(train, order=(p_, d, q), trend="c" if d == 0 else "t").fit(
                        disp=False
                    )
                except Exception:  # noqa: BLE001 - a failed candidate is skipped
                    continue
                if np.isfinite(r.aic) and (best is None or r.aic < best[0]):
                    best = (r.aic, (p_, d, q), r)
    fits[f"ARIMA{best[1]} (AIC)"] = best[2]
    ets = []
    for trend, damped in ((False, False), (True, True)):
        kw = dict(trend=trend, damped_trend=damped)
        if seasonal:
            kw["seasonal"] = seasonal
        r = ExponentialSmoothing(train, **kw).fit(disp=False)
        ets.append((r.aic, "damped trend" if trend else "level", r))
    aic, what, r = min(ets, key=lambda e: e[0])
    fits[f"exp. smoothing, {what} (AIC)"] = r
    return fits


def baseline_scores(res, y, train_len):
    T = len(y)
    errors, crps, inside = ({k: [] for k in HORIZONS} for _ in range(3))
    for t in range(train_len - 1, T - 1):
        fc = res.apply(y[: t + 1]).get_forecast(max(HORIZONS))
        mean, var = np.asarray(fc.predicted_mean), np.asarray(fc.var_pred_mean)
        for k in HORIZONS:
            if t + k < T and np.isfinite(y[t + k]):
                m, sd = mean[k - 1], np.sqrt(var[k - 1])
                c, ok = gaussian_scores(m, sd, y[t + k])
                errors[k].append(m - y[t + k])
                crps[k].append(c)
                inside[k].append(ok)
    return summarise(errors, crps, inside)


# -- ppl_dyn -----------------------------------------------------------------------------
def ppl_dyn_scores(name, y, train_len, state_dim, iters, num_paths):
    import ppl_dyn
    from ppl_dyn.infer import (
        EM,
        ExtendedKalmanSmoother,
        KalmanSmoother,
        LinearGaussianMStep,
        fit_nested,
    )
    from ppl_dyn.infer.nested import factor_analysis_init
    from ppl_dyn.models import lds, rbf, tanh_rnn

    train = y[:train_len]
    mean, scale = np.nanmean(train), np.nanstd(train)
    z = ((y - mean) / scale)[:, None]
    zt = z[:train_len]
    m_step = LinearGaussianMStep(map_estimate=True)
    out, seconds = {}, {}
    for label in ("ppl_dyn LDS", "ppl_dyn tanh-RNN", "ppl_dyn RBF"):
        t0 = time.perf_counter()
        kw = {"state_dim": state_dim}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # covariance floors
            if label == "ppl_dyn RBF":
                fit = fit_nested(jax.random.key(0), y=zt, state_dim=state_dim,
                                 num_centres=5 if state_dim == 2 else (11 if state_dim == 1 else 3),
                                 lds_iters=iters, rbf_iters=iters, progress_bar=False,
                                 map_estimate=True, max_spectral_radius=0.99)  # fmt: skip
                params, model, e_step = fit.rbf.params, rbf, ExtendedKalmanSmoother()
                kw.update(centres=np.asarray(fit.centres), widths=np.asarray(fit.widths))
            else:
                model = lds if label == "ppl_dyn LDS" else tanh_rnn
                e_step = KalmanSmoother() if model is lds else ExtendedKalmanSmoother()
                init = factor_analysis_init(zt, state_dim=state_dim)
                params = (
                    EM(model, e_step, m_step)
                    .run(
                        jax.random.key(0),
                        iters,
                        init=init,
                        y=zt,
                        rtol=1e-6,
                        progress_bar=False,
                        **kw,
                    )
                    .params
                )
        bt = ppl_dyn.backtest(
            params, model, y=z, horizons=HORIZONS, start=train_len - 1, level=LEVEL,
            num_paths=num_paths, e_step=None if model is lds else e_step,
            rng_key=jax.random.key(1), **kw,
        )  # fmt: skip
        errors, crps, inside = ({} for _ in range(3))
        for k in HORIZONS:
            target = np.full(len(bt.origins), np.nan)
            ok_t = bt.origins + k < len(y)
            target[ok_t] = y[bt.origins[ok_t] + k]
            seen = np.isfinite(target)
            m = bt.mean[k][:, 0] * scale + mean
            lo, hi = bt.lower[k][:, 0] * scale + mean, bt.upper[k][:, 0] * scale + mean
            errors[k] = (m - target)[seen]
            crps[k] = (bt.crps[k][:, 0] * scale)[seen]
            inside[k] = ((target >= lo) & (target <= hi))[seen]
        out[label] = summarise(errors, crps, inside)
        seconds[label] = time.perf_counter() - t0
    return out, seconds


def table(name, results, dx) -> str:
    transform, holdout, _, what = SERIES[name]
    head = (f"**{name}** ({what}; last {holdout} held out; ppl_dyn state_dim {dx})\n\n"
            "| method | RMSE 1 | RMSE 5 | RMSE 10 | CRPS 1 | CRPS 5 | CRPS 10 | "
            "cover 1 | cover 5 | cover 10 |\n|---|" + "---:|" * 9)  # fmt: skip
    rows = [head]
    best = {k: min(r[k]["rmse"] for r in results.values()) for k in HORIZONS}
    for label, r in results.items():
        cells = []
        for k in HORIZONS:
            v = f"{r[k]['rmse']:.4g}"
            cells.append(f"**{v}**" if r[k]["rmse"] == best[k] else v)
        cells += [f"{r[k]['crps']:.4g}" for k in HORIZONS]
        cells += [f"{r[k]['coverage']:.2f}" for k in HORIZONS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="nile only, short fits")
    ap.add_argument("--only", default=None, help="comma-separated series names")
    ap.add_argument("--out", default=None, help="write the Markdown tables here")
    ap.add_argument("--state-dim", type=int, default=None, help="override ppl_dyn's state_dim")
    args = ap.parse_args(argv)
    names = ["nile"] if args.quick else list(SERIES)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
    iters, num_paths = (20, 200) if args.quick else (200, 1000)
    parts = []
    for name in names:
        y = load(name)
        transform, holdout, dx, _ = SERIES[name]
        dx = args.state_dim or dx
        train_len = len(y) - holdout
        t0 = time.perf_counter()
        results = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' convergence chatter
            for label, res in baseline_fits(
                y[:train_len], 12 if transform == "monthly" else None
            ).items():
                results[label] = baseline_scores(res, y, train_len)
        ours, seconds = ppl_dyn_scores(name, y, train_len, dx, iters, num_paths)
        results.update(ours)
        parts.append(table(name, results, dx))
        print(parts[-1], flush=True)
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        print(f"({name}: {time.perf_counter() - t0:.0f} s; {timing})\n", flush=True)
    text = (
        "Rolling-origin forecasts on held-out data (`python benchmarks/forecasting.py`; "
        "RMSE and CRPS in the units of the series, lower is better, the best RMSE per "
        "horizon in bold; cover = share of targets inside the central 90 % interval).\n\n"
        + "\n\n".join(parts)
        + "\n"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
