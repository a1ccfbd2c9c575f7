"""The comparison study (issue 6, part 5): its metric helpers against independent
computations, and the `--small` CLI run end to end."""

import json
import math

import jax
import numpy as np
import pytest

from ppl_dyn import cli
from ppl_dyn.infer import KalmanSmoother
from ppl_dyn.models import lds
from ppl_dyn.reproduce import comparison


@pytest.fixture(scope="module")
def lds_data():
    """A damped 2-d oscillator observed in noise, simulated with NumPy."""
    th = 2 * np.pi / 12
    params = dict(
        A=0.95 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]),
        b=np.array([0.1, 0.0]),
        C=np.array([[1.0, 0.5]]),
        d=np.array([0.3]),
        Q=0.1 * np.eye(2),
        R=np.array([[0.2]]),
        m0=np.zeros(2),
        P0=np.eye(2),
    )
    rng = np.random.default_rng(3)
    x = rng.multivariate_normal(params["m0"], params["P0"])
    ys = []
    for t in range(120):
        if t:
            x = params["A"] @ x + params["b"] + rng.multivariate_normal(np.zeros(2), params["Q"])
        ys.append(params["C"] @ x + params["d"] + np.sqrt(0.2) * rng.normal(size=1))
    return params, np.array(ys)


def test_gaussian_interval_coverage_is_nominal_within_monte_carlo_error():
    rng = np.random.default_rng(0)
    n = 20000
    mean, var = rng.normal(size=n), rng.uniform(0.1, 4.0, size=n)
    y = mean + np.sqrt(var) * rng.normal(size=n)
    for level in (0.5, 0.9):
        lo, hi = comparison.gaussian_interval(mean, var, level)
        cov = comparison.interval_coverage(y, lo, hi)
        se = math.sqrt(level * (1 - level) / n)
        assert abs(cov - level) < 4 * se, (level, cov)


def test_interval_coverage_counts_by_hand():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    assert comparison.interval_coverage(y, y - 1, y + 1) == 1.0
    assert comparison.interval_coverage(y, np.full(4, 0.5), np.full(4, 2.5)) == 0.5


def test_kalman_one_step_loglik_equals_log_marginal_difference(lds_data):
    params, y = lds_data
    fc = comparison.kalman_forecasts(params, lds, y=y, state_dim=2)
    start = 80
    full = float(KalmanSmoother().smooth(params, lds, y=y, state_dim=2).log_marginal)
    prefix = float(KalmanSmoother().smooth(params, lds, y=y[:start], state_dim=2).log_marginal)
    sc = comparison.score(fc, y, start)
    np.testing.assert_allclose(sc["loglik_sum"], full - prefix, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.sum(fc.log_pred), full, rtol=1e-9, atol=1e-9)


def test_kalman_k_step_mean_matches_iterated_filtered_mean(lds_data):
    params, y = lds_data
    fc = comparison.kalman_forecasts(params, lds, y=y, state_dim=2, horizons=(3,))
    post = KalmanSmoother().smooth(params, lds, y=y, state_dim=2)
    A, b = np.asarray(params["A"]), np.asarray(params["b"])
    C, d = np.asarray(params["C"]), np.asarray(params["d"])
    m = np.asarray(post.filtered_means)[40]
    for _ in range(3):
        m = A @ m + b
    np.testing.assert_allclose(fc.mean[3][40], C @ m + d, rtol=1e-10)


@pytest.mark.slow  # ~10 s, mostly compiling the particle forecaster
def test_particle_forecasts_match_exact_kalman_on_an_lds(lds_data):
    """The particle predictive (used for the nonlinear models) against the exact one."""
    params, y = lds_data
    exact = comparison.kalman_forecasts(params, lds, y=y, state_dim=2)
    pf = comparison.particle_forecasts(
        jax.random.key(0), params, lds, y=y, state_dim=2, num_particles=3000
    )
    se = exact, comparison.score(exact, y, 20)
    sp = comparison.score(pf, y, 20)
    assert abs(sp["loglik_per_step"] - se[1]["loglik_per_step"]) < 0.03
    for k in (1, 5, 10):
        scale = float(np.mean(exact.upper[k] - exact.lower[k]))
        assert np.max(np.abs(pf.mean[k][20:-k] - exact.mean[k][20:-k])) < 0.1 * scale
        np.testing.assert_allclose(np.mean(pf.upper[k] - pf.lower[k]), scale, rtol=0.05)


def test_score_aligns_targets_with_origins():
    y = np.arange(30.0)[:, None]
    # a perfect forecaster: mean[k][t] = y[t + k]
    mean = {k: np.concatenate([y[k:], np.full((k, 1), np.nan)]) for k in range(1, 11)}
    fc = comparison.Forecasts(mean, None, None, None, 0.9)
    sc = comparison.score(fc, y, 12)
    assert all(sc[f"rmse_{k}"] == 0.0 for k in range(1, 11))
    off = comparison.Forecasts({k: v + 2.0 for k, v in mean.items()}, None, None, None, 0.9)
    assert comparison.score(off, y, 12)["rmse_5"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="start"):
        comparison.score(fc, y, 5)


@pytest.mark.slow  # default-suite budget (~15 min on 2 cores): runs in the slow tier
def test_small_cli_run_writes_finite_metrics_for_every_dataset_and_model(tmp_path):
    out = tmp_path / "cmp"
    rc = cli.main(["reproduce", "comparison", "--small", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {"synthetic", "sunspots"}
    for ds, block in metrics["datasets"].items():
        assert set(comparison.MODELS) <= set(block["models"]), ds
        for name in comparison.MODELS:
            m = block["models"][name]
            keys = ["rmse_1", "rmse_5", "rmse_10", "fit_seconds"]
            if name in comparison.PROBABILISTIC:
                keys += ["loglik_per_step", "coverage_1", "coverage_5", "coverage_10"]
            for key in keys:
                assert m[key] is not None and np.isfinite(m[key]), (ds, name, key)
            if name in comparison.PROBABILISTIC:
                assert 0.0 <= m["coverage_1"] <= 1.0
    assert (out / "comparison.md").read_text().count("| LDS, EM (Kalman) |") == 2
    for fig in ("forecasts_synthetic.png", "forecasts_sunspots.png", "rmse_vs_horizon.png"):
        assert (out / fig).stat().st_size > 1000, fig
