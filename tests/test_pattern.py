"""The missing-data pattern given to the plug-ins when the program is traced picks the
same path as the run-time ``lax.cond``: an EM step traced knowing the pattern equals the
one traced without, for each pattern and each plug-in that uses it."""

import jax
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn.infer import KalmanSmoother, LinearGaussianMStep, PARISSmoother
from ppl_dyn.infer._pattern import COMPLETE, MIXED, SHARED, data_pattern, with_data_pattern
from ppl_dyn.infer.em import _make_step
from ppl_dyn.infer.psaem import StochasticApproximation
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


def test_plugins_are_told_the_pattern_as_a_field():
    """The pattern is an explicit static field of the plug-in values (no global state);
    a plug-in without ``with_data_pattern`` (a user's) is passed through unchanged."""
    assert with_data_pattern(KalmanSmoother(), COMPLETE).data_pattern == COMPLETE
    assert KalmanSmoother().data_pattern is None
    assert with_data_pattern(KalmanSmoother(), None) == KalmanSmoother()
    sa = with_data_pattern(StochasticApproximation(LinearGaussianMStep()), SHARED)
    assert sa.m_step.data_pattern == SHARED

    class Mine:
        def posterior(self, rng_key, ss, y, u):
            raise AssertionError

    mine = Mine()
    assert with_data_pattern(mine, COMPLETE) is mine


@pytest.mark.slow  # default-suite budget (~15 min on 2 cores): runs in the slow tier
def test_paris_step_knowing_complete_data_equals_unknowing():
    """PaRIS skips the imputation terms when it knows the data are complete: same
    statistics (same keys) as the general path, which imputes nothing here."""
    sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=25, state_dim=1, obs_dim=2)
    y = np.asarray(sim["y"])
    params = dict(sim["params"])
    args = (lds, PARISSmoother(50), LinearGaussianMStep(), (("state_dim", 1),))
    told = _make_step(*args, COMPLETE)(params, {"y": y}, jax.random.key(1), 0)
    plain = _make_step(*args, None)(params, {"y": y}, jax.random.key(1), 0)
    np.testing.assert_allclose(told[1], plain[1], rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(told[0][k], plain[0][k], rtol=1e-10, atol=1e-12)
