"""Train a noisy tanh-RNN by particle EM and forecast (seed 000, small version).

Run: python examples/tanh_rnn_particle_em.py [--small]
For the full reproduction: ppl-dyn reproduce unkelbach --out DIR
"""

import sys

import jax

jax.config.update("jax_enable_x64", True)
from jax import random  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn.infer import EM, ParticleSmoother  # noqa: E402
from ppl_dyn.models import tanh_rnn  # noqa: E402
from ppl_dyn.reproduce.unkelbach import true_params  # noqa: E402

small = "--small" in sys.argv
T, iters, N = (80, 3, 20) if small else (1000, 100, 100)
kw = dict(state_dim=2, obs_dim=1, bias=False)
y_train = ppl_dyn.simulate(random.key(0), tanh_rnn, true_params(), num_steps=T, **kw)["y"]
y_test = ppl_dyn.simulate(random.key(1), tanh_rnn, true_params(), num_steps=T, **kw)["y"]
result = EM(tanh_rnn, ParticleSmoother(num_particles=N)).run(
    random.key(2), iters, y=y_train, state_dim=3, bias=False
)
pred = ppl_dyn.predict(
    result.params,
    tanh_rnn,
    y=y_test,
    horizons=(1, 5, 10),
    state_dim=3,
    bias=False,
    rng_key=random.key(3),
    num_particles=4 * N,
)
print("test RMSE by horizon:", ppl_dyn.prediction_rmse(pred, y_test))
