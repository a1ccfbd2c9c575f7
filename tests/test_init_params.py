"""EM.init with given starting values: values that fit the model as they are skip the
abstract run of adapt_params (fresh-process start-up time), with the same result and
the same errors as the adapting path."""

import jax
import numpy as np
import pytest

import ppl_dyn.infer.em as em_mod
from ppl_dyn.infer import EM, KalmanSmoother
from ppl_dyn.models import lds


def _values(rng, dx=2, dy=3):
    return dict(
        A=0.5 * np.eye(dx),
        C=rng.standard_normal((dy, dx)),
        Q=0.2 * np.eye(dx),
        R=0.3 * np.eye(dy),
        m0=np.zeros(dx),
        P0=np.eye(dx),
    )


def test_fitting_values_skip_adaptation_and_match_the_adapting_path(monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((40, 3))
    init = dict(_values(rng), not_a_site=np.ones(7))  # unknown names are dropped
    em = EM(lds, KalmanSmoother())
    kw = dict(y=y, state_dim=2)
    slow = em_mod.initial_params(lds, jax.random.key(1), init, kw, split_key=False)[0]

    def no_adapt(*a, **k):
        raise AssertionError("adapt_params ran for values that fit the model")

    monkeypatch.setattr(em_mod, "adapt_params", no_adapt)
    state = em.init(jax.random.key(1), init, y=y, state_dim=2)
    # the given sites plus prior draws (same key) for the biases b, d
    assert set(state.params) == set(slow) == {"A", "C", "Q", "R", "m0", "P0", "b", "d"}
    for k in slow:
        np.testing.assert_array_equal(np.asarray(state.params[k]), np.asarray(slow[k]))
        assert state.params[k].dtype == slow[k].dtype


def test_values_that_do_not_fit_take_the_adapting_path(monkeypatch):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((40, 3))
    calls = []
    real = em_mod.adapt_params
    monkeypatch.setattr(em_mod, "adapt_params", lambda *a: calls.append(1) or real(*a))
    bad = dict(_values(rng), C=np.ones((3, 3)))  # wrong shape: named by the slow path
    with pytest.raises(ValueError, match="'C'"):
        EM(lds, KalmanSmoother()).init(jax.random.key(1), bad, y=y, state_dim=2)
    assert calls


def test_invalid_fitting_values_raise_by_name():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((40, 3))
    bad = dict(_values(rng), Q=np.array([[1.0, 2.0], [2.0, 1.0]]))  # not PD
    with pytest.raises(ValueError, match="Q"):
        EM(lds, KalmanSmoother()).init(jax.random.key(1), bad, y=y, state_dim=2)
