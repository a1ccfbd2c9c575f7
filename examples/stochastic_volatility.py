"""A model we do not ship, fitted by particle EM with the gradient M-step.

The stochastic-volatility model
    x_1 ~ N(mu, sigma^2 / (1 - phi^2)),  x_t ~ N(mu + phi (x_{t-1} - mu), sigma^2),
    y_t ~ N(0, exp(x_t))
has no closed-form M-step; GradientMStep takes a few Adam steps on the Monte Carlo
Q-function over backward-simulated trajectories.

Run: python examples/stochastic_volatility.py [--small]
"""

import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import random  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn.infer import EM, GradientMStep, ParticleSmoother  # noqa: E402


def stochastic_volatility(y=None, *, num_steps=None, num_sequences=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    init = dist.Normal(mu, sigma / jnp.sqrt(1 - phi**2)).expand([1]).to_event(1)
    return ppl_dyn.markov(
        init,
        lambda x, u: dist.Normal(mu + phi * (x - mu), sigma).to_event(1),
        lambda x, u: dist.Normal(0.0, jnp.exp(x / 2)).to_event(1),
        y=y,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


small = "--small" in sys.argv
T, iters, N = (60, 3, 32) if small else (1000, 80, 200)
true = {"mu": -1.0, "phi": 0.95, "sigma": 0.3}
y = ppl_dyn.simulate(random.key(0), stochastic_volatility, true, num_steps=T)["y"]
em = EM(
    stochastic_volatility,
    ParticleSmoother(num_particles=N, mode="ffbsi", num_trajectories=N // 4),
    GradientMStep(num_steps=25, learning_rate=0.02),
)
result = em.run(
    random.key(1), iters, y=y, init_params={"mu": 0.0, "phi": 0.5, "sigma": 1.0}, smoothing_window=5
)
print("true:  ", true)
print("fitted:", {k: round(float(v), 3) for k, v in result.params.items()})
print("particle log-likelihood, first and last:", result.log_marginals[[0, -1]])
