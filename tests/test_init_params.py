"""EM.init with given starting values: values that fit the model as they are skip the
abstract run of adapt_params (fresh-process start-up time), with the same result and
the same errors as the adapting path."""

import jax
import numpy as np
import pytest

import ppl_dyn.infer.em as em_mod
from ppl_dyn.infer import EM, KalmanSmoother
from ppl_dyn.infer._compile import clear_programs
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
    init = _values(rng)
    em = EM(lds, KalmanSmoother())
    kw = dict(y=y, state_dim=2)
    slow = em_mod.initial_params(lds, jax.random.key(1), init, kw, split_key=False)[0]
    # a name that is no site of the model is a typo, refused in both paths (it used to
    # be dropped silently)
    for values in (dict(init, not_a_site=np.ones(7)), {"not_a_site": np.ones(7)}):
        with pytest.raises(ValueError, match=r"no site of the model: \['not_a_site'\]"):
            em_mod.initial_params(lds, jax.random.key(1), values, kw, split_key=False)

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


def test_compile_ahead_gives_the_same_fit_and_one_compilation(monkeypatch):
    """EM.run with starting values compiles its step in a background thread while
    EM.init validates them; the fit is the same as without, and the step the loop
    calls is that compilation (no second one)."""
    from ppl_dyn.infer._run import validate_data

    rng = np.random.default_rng(3)
    y = rng.standard_normal((50, 3))
    init = dict(_values(rng), b=np.zeros(2), d=np.zeros(3))  # every free site given
    em = EM(lds, KalmanSmoother(), em_mod.LinearGaussianMStep(covariance_floor=1e-7))
    threads = []
    real = em_mod.compile_ahead
    monkeypatch.setattr(em_mod, "compile_ahead", lambda *a: threads.append(real(*a)) or threads[-1])
    ahead = em.run(jax.random.key(4), 5, y=y, state_dim=2, init_params=init, progress_bar=False)
    assert threads and threads[0] is not None and not threads[0].is_alive()
    step, dynamic = em._compiled(validate_data(dict(y=y, state_dim=2)))
    assert step._cache_size() == 1
    # b and d missing (prior draws needed): nothing to trace ahead
    assert real(step, _values(rng), dynamic, jax.random.key(4), ()) is None

    monkeypatch.setattr(em_mod, "compile_ahead", lambda *a: None)
    clear_programs()
    plain = em.run(jax.random.key(4), 5, y=y, state_dim=2, init_params=init, progress_bar=False)
    np.testing.assert_array_equal(ahead.log_marginals, plain.log_marginals)
    for k in plain.params:
        np.testing.assert_array_equal(np.asarray(ahead.params[k]), np.asarray(plain.params[k]))

    # XLA compiles the step once: the loop's call finds the ahead compilation (a call
    # signature other than the lowered one would compile it again, unseen by the cache
    # count above). Everything else is warm from the runs above.
    monkeypatch.setattr(em_mod, "compile_ahead", real)
    clear_programs()
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        em.run(jax.random.key(4), 5, y=y, state_dim=2, init_params=init, progress_bar=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiles) == 1, compiles


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(C=np.ones((3, 3))), "'C'"),  # wrong shape: named by adapt_params
        (dict(A=np.full((2, 2), np.nan)), "A"),  # NaN: named by check_params
        (dict(Q=-np.eye(2)), "Q"),  # not a covariance
    ],
)
def test_invalid_starting_values_raise_from_init_not_from_the_compile_ahead(bad, match):
    rng = np.random.default_rng(5)
    y = rng.standard_normal((30, 3))
    init = dict(_values(rng), **bad)
    with pytest.raises(ValueError, match=match):
        EM(lds, KalmanSmoother()).run(
            jax.random.key(0), 3, y=y, state_dim=2, init_params=init, progress_bar=False
        )
