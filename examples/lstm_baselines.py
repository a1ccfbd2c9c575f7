"""Conventional baselines on the sunspots series: a deterministic tanh-RNN and an LSTM
trained by back-propagation through time on the squared one-step error (seed 000, eq 8),
scored by 1/5/10-step forecast RMSE on held-out years; the full run also fits the
stochastic LSTM state-space model by particle EM for comparison.

Run: python examples/lstm_baselines.py [--small]
"""

import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402
from jax import random  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn import baselines  # noqa: E402
from ppl_dyn.datasets import sunspots  # noqa: E402

small = "--small" in sys.argv
hidden, steps = (4, 300) if small else (6, 3000)
horizons = (1, 5, 10)

raw = sunspots().y  # (309, 1), yearly 1700-2008
split = 250  # train on 1700-1949, test on 1950-2008
mu, sd = np.nanmean(raw[:split]), np.nanstd(raw[:split])
y = (raw - mu) / sd


def test_rmse(pred):
    """RMSE of forecasts whose targets are test years; the forecasts are made along the
    whole series, so the training years are the warm-up."""
    out = {}
    for k in horizons:
        f = np.asarray(pred.mean[k])[split - k : len(y) - k]
        out[k] = round(float(np.sqrt(np.mean((f - y[split:]) ** 2))), 3)
    return out


class _Naive:  # persistence: y_{t+k} forecast by y_t
    horizons = horizons
    mean = {k: y for k in horizons}


print(f"sunspots: train {split} years, test {len(y) - split} years (standardised)")
print("persistence RMSE:", test_rmse(_Naive))
for cell in ("tanh", "lstm"):
    net = baselines.Baseline(cell, hidden)
    t0 = time.perf_counter()
    fit = baselines.fit_bptt(
        random.key(0),
        net,
        y=y[:split],
        num_steps=steps,
        learning_rate=5e-3,
        clip_norm=1.0,
        washout=5,
        progress_bar=not small,
    )
    secs = time.perf_counter() - t0
    pred = baselines.predict(fit.params, net, y=y, horizons=horizons)
    print(
        f"BPTT {cell:4s} (H={hidden}): train loss {fit.losses[0]:.3f} -> {fit.final_loss:.4f} "
        f"in {secs:.1f} s; test RMSE {test_rmse(pred)}"
    )

if not small:
    from ppl_dyn.infer import EM, GradientMStep, ParticleSmoother
    from ppl_dyn.models.lstm import lstm

    t0 = time.perf_counter()
    em = EM(
        lstm,
        ParticleSmoother(num_particles=200, mode="ffbsi", num_trajectories=50),
        GradientMStep(num_steps=50, learning_rate=0.02),
    )
    res = em.run(random.key(1), 60, y=y[:split], state_dim=3)
    secs = time.perf_counter() - t0
    pred = ppl_dyn.predict(
        res.params,
        lstm,
        y=y,
        horizons=horizons,
        state_dim=3,
        rng_key=random.key(2),
        num_particles=1000,
    )
    print(
        f"stochastic LSTM, particle EM (H=3): log-lik {res.log_marginals[0]:.1f} -> "
        f"{res.log_marginals[-1]:.1f} in {secs:.0f} s; test RMSE {test_rmse(pred)}"
    )
