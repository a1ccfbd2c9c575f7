"""Rolling-origin backtests (``ppl_dyn.backtest``).

Oracles: the dense joint Gaussian of an LDS (the exact predictive law of ``y[t + k]``
given ``y[: t + 1]``), the closed-form CRPS of a Gaussian, a brute-force O(N^2) CRPS,
and the binomial law of interval coverage on data drawn from the model itself."""

import jax
import numpy as np
import pytest
from oracles import dense_joint
from scipy import stats

import ppl_dyn
from ppl_dyn.backtest import crps_samples
from ppl_dyn.infer import ExtendedKalmanSmoother
from ppl_dyn.infer._compile import _PROGRAMS
from ppl_dyn.models import lds, tanh_rnn

P = {"A": np.array([[0.8, 0.2], [-0.3, 0.7]]), "C": np.array([[1.0, 0.5]]),
     "Q": 0.2 * np.eye(2), "R": np.array([[0.3]]), "b": np.array([0.1, 0.0]),
     "d": np.array([0.5]), "m0": np.zeros(2), "P0": np.eye(2)}  # fmt: skip


def gaussian_crps(mu, sd, y):
    z = (y - mu) / sd
    return sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


def exact_predictive(params, y, t, k):
    """Mean and sd of y[t + k] given y[: t + 1] (one output) from the dense joint."""
    T = y.shape[0]
    mu, Sigma, dx, dy = dense_joint(params, T)
    iy = T * dx + np.arange(T * dy)
    mu_y, S = mu[iy], Sigma[np.ix_(iy, iy)]
    o, j = np.arange((t + 1) * dy), np.array([(t + k) * dy])
    K = np.linalg.solve(S[np.ix_(o, o)], S[np.ix_(o, j)]).T
    m = mu_y[j] + K @ (y.reshape(-1)[o] - mu_y[o])
    v = S[np.ix_(j, j)] - K @ S[np.ix_(o, j)]
    return float(m[0]), float(np.sqrt(v[0, 0]))


def test_crps_of_samples_equals_the_pair_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(301, 3)), rng.normal(size=3)
    brute = np.mean(np.abs(x - y), 0) - np.abs(x[:, None] - x[None]).sum((0, 1)) / (2 * 301**2)
    np.testing.assert_allclose(crps_samples(x, y), brute, rtol=1e-12, atol=1e-14)


def test_linear_model_forecasts_match_the_exact_predictive_law():
    y = np.asarray(ppl_dyn.simulate(jax.random.key(0), lds, P, num_steps=40, state_dim=2,
                                    obs_dim=1)["y"])  # fmt: skip
    N = 4000
    bt = ppl_dyn.backtest(P, lds, y=y, state_dim=2, horizons=(1, 4), start=10, level=0.8,
                          num_paths=N, rng_key=jax.random.key(1))  # fmt: skip
    assert bt.filter == "kalman" and bt.origins[0] == 10
    z80 = stats.norm.ppf(0.9)
    for k in (1, 4):
        for t in (10, 20, 30, 39 - k):
            m, sd = exact_predictive(P, y, t, k)
            i = t - 10
            se = sd / np.sqrt(N)
            assert abs(bt.mean[k][i, 0] - m) < 5 * se, (k, t)
            assert abs(bt.median[k][i, 0] - m) < 5 * 1.26 * se, (k, t)  # 1.2533 sd/sqrt(N)
            q_se = np.sqrt(0.1 * 0.9 / N) / stats.norm.pdf(z80) * sd
            assert abs(bt.lower[k][i, 0] - (m - z80 * sd)) < 5 * q_se
            assert abs(bt.upper[k][i, 0] - (m + z80 * sd)) < 5 * q_se
        # past the end: no forecast scored
        assert np.all(np.isnan(bt.mean[k][39 - k + 1 - 10 :]))
    # CRPS: the mean over the origins against the Gaussian closed form
    for k in (1, 4):
        ts = np.arange(10, 40 - k)
        exact = [gaussian_crps(*exact_predictive(P, y, t, k), y[t + k, 0]) for t in ts]
        sd_max = max(exact_predictive(P, y, t, k)[1] for t in ts)
        assert abs(bt.scores[k]["crps"] - np.mean(exact)) < 5 * sd_max / np.sqrt(N) + sd_max / N
        # the scores are those of the returned forecasts
        err = bt.mean[k][: len(ts), 0] - y[ts + k, 0]
        assert bt.scores[k]["n"] == len(ts)
        np.testing.assert_allclose(bt.scores[k]["rmse"], np.sqrt(np.mean(err**2)), rtol=1e-12)
        np.testing.assert_allclose(bt.scores[k]["mae"], np.mean(np.abs(err)), rtol=1e-12)


def test_intervals_are_calibrated_on_data_from_the_model():
    """At the true parameters the one-step errors are independent innovations: the 90%
    interval covers a Binomial(n, 0.9) share of the targets."""
    sim = ppl_dyn.simulate(jax.random.key(3), lds, P, num_steps=60, num_sequences=10,
                           state_dim=2, obs_dim=1)  # fmt: skip
    bt = ppl_dyn.backtest(P, lds, y=sim["y"], state_dim=2, horizons=(1,), num_paths=2000,
                          rng_key=jax.random.key(4))  # fmt: skip
    n = bt.scores[1]["n"]
    assert n == 10 * 59 and bt.mean[1].shape == (10, 60, 1)
    assert abs(bt.scores[1]["coverage"] - 0.9) < 4 * np.sqrt(0.09 / n) + 0.01


def test_one_compilation_for_new_parameters_and_data():
    y1 = np.asarray(ppl_dyn.simulate(jax.random.key(5), lds, P, num_steps=30, state_dim=2,
                                     obs_dim=1)["y"])  # fmt: skip
    kw = dict(state_dim=2, horizons=(1, 3), num_paths=200, rng_key=jax.random.key(0))
    a = ppl_dyn.backtest(P, lds, y=y1, **kw)
    fn = _PROGRAMS[("forecaster", lds, a_filter(), (("state_dim", 2),),
                    ((1, 3), 0.9, 200, 1000))]  # fmt: skip
    before = fn._cache_size()
    b = ppl_dyn.backtest(dict(P, R=np.array([[0.6]])), lds, y=y1[::-1].copy(), **kw)
    assert fn._cache_size() == before >= 1  # the same program ran again
    assert a.scores[1]["crps"] != b.scores[1]["crps"]


def a_filter():
    from ppl_dyn.infer import KalmanSmoother

    return KalmanSmoother()


@pytest.mark.parametrize("e_step", [None, ExtendedKalmanSmoother()])
def test_nonlinear_model_uses_particles_or_the_given_gaussian_filter(e_step):
    sim = ppl_dyn.simulate(jax.random.key(6), tanh_rnn, num_steps=50, state_dim=2, obs_dim=2)
    bt = ppl_dyn.backtest(sim["params"], tanh_rnn, y=sim["y"], state_dim=2, horizons=(1, 5),
                          start=30, num_paths=300, num_particles=300, e_step=e_step,
                          rng_key=jax.random.key(7))  # fmt: skip
    assert bt.filter == ("particle" if e_step is None else "ExtendedKalmanSmoother")
    for k in (1, 5):
        s = bt.scores[k]
        assert s["n"] == 2 * (50 - 30 - k) and np.isfinite(s["crps"]) and 0 <= s["coverage"] <= 1
        assert np.all(bt.lower[k][: 20 - k] <= bt.upper[k][: 20 - k])
    assert "| 5 |" in bt.table()


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        (dict(start=29), r"start must be in \[0, 28\]"),
        (dict(level=1.0), "level must be in"),
        (dict(horizons=(0, 2)), "horizons must be positive"),
        (dict(num_paths=1), "num_paths must be an int >= 2"),
    ],
)
def test_bad_arguments_are_named(kwargs, problem):
    y = np.zeros((30, 1))
    with pytest.raises(ValueError, match=problem):
        ppl_dyn.backtest(P, lds, y=y, state_dim=2, rng_key=jax.random.key(0), **kwargs)


def test_predict_compiles_once_for_new_parameters_and_data():
    """ppl_dyn.predict: one compiled program per model, filter and sizes (each call
    used to compile again: 6-20 s)."""

    from ppl_dyn.infer import KalmanSmoother

    y = np.asarray(ppl_dyn.simulate(jax.random.key(8), lds, P, num_steps=30, state_dim=2,
                                    obs_dim=1)["y"])  # fmt: skip
    a = ppl_dyn.predict(P, lds, y=y, state_dim=2, horizons=(1, 3), rng_key=jax.random.key(0))
    fn = _PROGRAMS[("predictor", lds, KalmanSmoother(), (("state_dim", 2),),
                    ("rollout", 3, 1000, True))]  # fmt: skip
    before = fn._cache_size()
    b = ppl_dyn.predict(dict(P, R=np.array([[0.6]])), lds, y=y[::-1].copy(), state_dim=2,
                        horizons=(1, 3), rng_key=jax.random.key(1))  # fmt: skip
    assert fn._cache_size() == before >= 1 and a.filter == b.filter == "kalman"
    assert not np.allclose(a.mean[1], b.mean[1])
