"""Fit a linear dynamical system by EM and look at the smoothed states.

Run: python examples/lds_em.py [--small]
"""

import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import random  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn.infer import EM, KalmanSmoother  # noqa: E402
from ppl_dyn.models import lds  # noqa: E402

small = "--small" in sys.argv
T, iters = (50, 10) if small else (1000, 200)
true = {
    "A": jnp.array([[0.95, 0.2], [-0.2, 0.95]]),
    "C": jnp.array([[1.0, 0.0], [0.3, 1.0], [0.5, -0.5]]),
    "Q": 0.05 * jnp.eye(2),
    "R": 0.1 * jnp.eye(3),
    "b": jnp.zeros(2),
    "d": jnp.zeros(3),
    "m0": jnp.zeros(2),
    "P0": jnp.eye(2),
}
y = np.array(
    ppl_dyn.simulate(
        random.key(0), lds, true, num_steps=T, num_sequences=4, state_dim=2, obs_dim=3
    )["y"]
)
y[:, 10:15, 1] = np.nan  # missing entries are fine
result = EM(lds, KalmanSmoother()).run(random.key(1), iters, y=y, state_dim=2, rtol=1e-9)
post = KalmanSmoother().smooth(result.params, lds, y=y, state_dim=2)
print("log-likelihood per iteration (first, last):", result.log_marginals[[0, -1]])
print("eigenvalues of A, true:  ", np.linalg.eigvals(np.asarray(true["A"])))
print("eigenvalues of A, fitted:", np.linalg.eigvals(np.asarray(result.params["A"])))
print("smoothed means shape:", post.means.shape)
