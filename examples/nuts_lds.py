"""Bayesian local-level model of the Nile flow: NUTS with the states integrated out.

The Nile series (``ppl_dyn.datasets.nile``, 1871-1970, shipped with the package) is
standardised and modelled as a random walk observed with noise, i.e. the built-in LDS
with ``A = C = 1``, no offsets and ``P0 = 1`` (sites frozen with
``numpyro.handlers.condition``):

    x_1 ~ N(m0, 1),  x_t ~ N(x_{t-1}, Q),  y_t ~ N(x_t, R).

``ppl_dyn.handlers.marginalize`` replaces the latent states by the Kalman filter's exact
log-marginal, so NUTS samples only (m0, Q, R). The script runs BlackJAX NUTS through
``ppl_dyn.mcmc.run_blackjax`` (NumPyro's ``MCMC(NUTS(model))`` takes the same model), prints
the ArviZ summary and the sampler diagnostics, and writes a 20-year forecast with 90 %
bands that include the parameter uncertainty.

Run: python examples/nuts_lds.py [--small] [--out DIR]   (default DIR: nuts_lds_output)
"""

import argparse
import pathlib

import jax
import matplotlib

matplotlib.use("Agg")
jax.config.update("jax_enable_x64", True)
import arviz as az  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jax import random  # noqa: E402
from numpyro.handlers import condition  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn import datasets  # noqa: E402
from ppl_dyn.models import lds  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--small", action="store_true", help="a short run for smoke tests")
ap.add_argument("--out", default="nuts_lds_output", help="directory for the figure")
args = ap.parse_args()
num_warmup, num_samples = (100, 100) if args.small else (1000, 1000)

nile = datasets.nile()
shift, scale = float(np.nanmean(nile.y)), float(np.nanstd(nile.y))
y = (nile.y - shift) / scale  # the built-in priors expect data of unit scale

local_level = condition(
    lds,
    data={
        "A": jnp.ones((1, 1)),
        "C": jnp.ones((1, 1)),
        "b": jnp.zeros(1),
        "d": jnp.zeros(1),
        "P0": jnp.ones((1, 1)),
    },
)
run = ppl_dyn.mcmc.run_blackjax(
    random.key(0),
    ppl_dyn.handlers.marginalize(local_level),
    num_warmup=num_warmup,
    num_samples=num_samples,
    num_chains=2,
    print_summary=False,
    y=y,
    state_dim=1,
)

# the one-step-ahead log-densities (for az.loo) cost one more compilation: full run only
idata = ppl_dyn.to_inference_data(run, log_likelihood=not args.small)
print(az.summary(idata, var_names=["m0", "Q", "R"], kind="stats" if args.small else "all"))
ppl_dyn.mcmc.print_diagnostics(run)
if not args.small:
    print(az.loo(idata))
ratio = idata.posterior["Q"].values[..., 0, 0] / idata.posterior["R"].values[..., 0, 0]
print("posterior median of the signal-to-noise ratio Q/R: %.3f" % np.median(ratio))

horizon = 20
fc = ppl_dyn.forecast(random.key(1), run, horizon, num_paths=4 if args.small else None)
mean = np.asarray(fc.mean)[:, 0] * scale + shift
lower = np.asarray(fc.lower)[:, 0] * scale + shift
upper = np.asarray(fc.upper)[:, 0] * scale + shift
last = int(nile.time[-1])
print(
    "forecast for %d: %.0f (%d %% band %.0f to %.0f) %s"
    % (last + horizon, mean[-1], round(100 * fc.level), lower[-1], upper[-1], nile.units)
)

out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
future = last + np.arange(1, horizon + 1)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(nile.time, nile.y[:, 0], "k.", label="Nile flow at Aswan")
ax.plot(future, mean, "C0-", label="forecast mean")
ax.fill_between(
    future, lower, upper, color="C0", alpha=0.3, label=f"{round(100 * fc.level)} % band"
)
ax.set_xlabel("year")
ax.set_ylabel(nile.units)
ax.legend(loc="lower left", ncol=3, fontsize="small")
fig.tight_layout()
fig.savefig(out / "nile_forecast.png", dpi=110)
print("figure:", out / "nile_forecast.png")
