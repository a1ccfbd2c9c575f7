"""The trace-time missing-data hint picks the same path as the run-time ``lax.cond``:
an EM step traced with the hint equals the one traced without, for each pattern."""

import jax
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn.infer import KalmanSmoother, LinearGaussianMStep
from ppl_dyn.infer._pattern import COMPLETE, MIXED, SHARED, data_pattern
from ppl_dyn.infer.em import _make_step
from ppl_dyn.models import lds


def test_data_pattern():
    y = np.zeros((3, 5, 2))
    assert data_pattern(y) == COMPLETE
    assert data_pattern(None) is None
    y[:, 1, 0] = np.nan
    assert data_pattern(y) == SHARED
    assert data_pattern(y[0]) == SHARED  # one sequence: trivially shared
    y[2, 3, 1] = np.nan
    assert data_pattern(y) == MIXED
    seen = []
    jax.jit(lambda a: seen.append(data_pattern(a)) or a)(np.zeros(3))
    assert seen == [None]


# COMPLETE: every EM test runs the hinted step; here with dy > dx it also checks the
# information-form filter's one-factor-of-R path against the general one
@pytest.mark.parametrize("pattern, obs_dim", [(SHARED, 2), (MIXED, 2), (COMPLETE, 3)])
def test_hinted_step_equals_unhinted(pattern, obs_dim):
    sim = ppl_dyn.simulate(
        jax.random.key(0), lds, num_steps=30, num_sequences=3, state_dim=2, obs_dim=obs_dim
    )
    y = np.array(sim["y"])
    if pattern != COMPLETE:
        y[:, 4:7, 0] = np.nan
    if pattern == MIXED:
        y[1, 10, 1] = np.nan
    assert data_pattern(y) == pattern
    params = {k: v for k, v in sim["params"].items()}
    static = (("state_dim", 2),)
    args = (lds, KalmanSmoother(), LinearGaussianMStep(), static)
    hinted = _make_step(*args, pattern)(params, {"y": y}, jax.random.key(1), 0)
    plain = _make_step(*args, None)(params, {"y": y}, jax.random.key(1), 0)
    np.testing.assert_allclose(hinted[1], plain[1], rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(hinted[0][k], plain[0][k], rtol=1e-10, atol=1e-12)
