"""The PSAEM-reaches-the-EM-fixed-point check, shared by tests/test_psaem.py and
tests/test_ragged_particle.py (scalar LDS with A, b, Q free).

Oracle: exact EM (Kalman E-step) run to rtol 1e-13. gamma = 1 PSAEM iterates scatter
around its fixed point with an s.d. sigma_1 that does not shrink; with the decaying
schedule (gamma = 1 for 50 iterations, then (k - 50)^-0.7) the spread collapses and the
last iterate is within 0.75 sigma_1 of the fixed point (a ~3.4 s.d. bound: see
tests/test_psaem.py::test_psaem_converges_to_the_exact_em_fixed_point).
"""

import jax
import numpy as np

from ppl_dyn.infer import EM, PSAEM, KalmanSmoother, step_size_schedule

FREE = ("A", "b", "Q")
INIT = dict(A=np.array([[0.5]]), Q=np.array([[1.0]]), b=np.array([0.0]))
K, N = 300, 10  # PSAEM iterations and particles


def em_fixed_point(model, y) -> dict:
    """The exact-EM fixed point of the free sites (scalars) from ``INIT``."""
    res = EM(model, KalmanSmoother()).run(
        jax.random.key(0), 500, init_params=INIT, rtol=1e-13, y=y, state_dim=1,
        progress_bar=False,
    )  # fmt: skip
    assert res.converged
    return {k: float(np.ravel(res.params[k])[0]) for k in FREE}


def run_noisy_and_sa(model, y):
    """PSAEM with gamma = 1 and with the decaying schedule, from ``INIT``."""
    kw = dict(init_params=INIT, y=y, state_dim=1, progress_bar=False)
    noisy = PSAEM(model, N, step_size=1.0).run(jax.random.key(1), K, **kw)
    sa = PSAEM(model, N, step_size=step_size_schedule(50, 0.7)).run(jax.random.key(2), K, **kw)
    return noisy, sa


def assert_sa_reaches_fixed_point(noisy, sa, fixed: dict) -> None:
    for name in FREE:
        h1 = noisy.params_history[name].reshape(K)
        h2 = sa.params_history[name].reshape(K)
        sigma1 = h1[100:].std()
        # noisy EM: centred near the fixed point
        assert abs(h1[100:].mean() - fixed[name]) < sigma1, (name, h1[100:].mean(), fixed)
        # SA: the spread collapses and the iterate sits on the fixed point
        assert h2[-50:].std() < 0.3 * sigma1, (name, h2[-50:].std(), sigma1)
        assert abs(h2[-1] - fixed[name]) < 0.75 * sigma1, (name, h2[-1], fixed, sigma1)
