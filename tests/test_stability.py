"""Bounded dynamics: ``LinearGaussianMStep(max_spectral_radius=...)``.

Oracles: NumPy's eigenvalues (the spectral radius), and the noise-free mean dynamics
iterated in NumPy from far outside the RBF centres."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn import datasets
from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, fit_nested
from ppl_dyn.infer.mstep import limit_spectral_radius, spectral_radius_bound
from ppl_dyn.models import lds, rbf_features


def rho(A):
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(A)))))


@pytest.mark.parametrize("seed", range(6))
def test_the_bound_is_above_the_spectral_radius_and_tight(seed):
    rng = np.random.default_rng(seed)
    d = 1 + seed % 4
    A = rng.normal(size=(d, d)) * rng.uniform(0.2, 3)
    if seed % 2:  # strongly non-normal: a large off-diagonal coupling
        A = np.triu(A) + np.triu(np.full((d, d), 50.0), 1)
    bound = float(spectral_radius_bound(jnp.asarray(A)))
    assert rho(A) <= bound * (1 + 1e-12) and bound <= 1.03 * rho(A) + 1e-300, (rho(A), bound)
    limited = np.asarray(limit_spectral_radius(jnp.asarray(A), 0.9))
    assert rho(limited) <= 0.9 + 1e-12
    if rho(A) < 0.85:  # already inside (with the bound's slack): unchanged
        np.testing.assert_array_equal(limited, A)


def test_em_keeps_the_lds_transition_inside_the_bound():
    p = {"A": np.array([[0.97, 0.2], [0.0, 0.9]]), "C": np.eye(2), "Q": 0.1 * np.eye(2),
         "R": 0.1 * np.eye(2), "b": np.zeros(2), "d": np.zeros(2), "m0": np.zeros(2),
         "P0": np.eye(2)}  # fmt: skip
    y = ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=300, state_dim=2, obs_dim=2)["y"]
    kw = dict(y=y, state_dim=2, progress_bar=False)
    free = EM(lds, KalmanSmoother()).run(jax.random.key(1), 60, **kw)
    bounded = EM(lds, KalmanSmoother(), LinearGaussianMStep(max_spectral_radius=0.8)).run(
        jax.random.key(1), 60, **kw
    )
    assert rho(free.params["A"]) > 0.9  # the data's dynamics
    assert rho(bounded.params["A"]) <= 0.8 + 1e-12
    assert bounded.log_marginals[-1] < free.log_marginals[-1]  # the price, in the likelihood


@pytest.mark.filterwarnings("ignore:EM applied the covariance eigenvalue floor")
def test_an_rbf_fit_that_explodes_stays_bounded_with_the_bound():
    """Sunspots (standardised, last 40 years held out), maximum likelihood: the fitted
    RBF dynamics' linear part has spectral radius 1.26, and the noise-free mean started
    outside the centres grows without bound (|x| 4e13 after 100 steps); with
    max_spectral_radius=0.99 it decays. Measured price: log p(y) -106.2 -> -183.6 after
    100 + 100 iterations; the 10-step-ahead RMSE of the predictive mean on the held-out
    years falls from 340.9 to 75.8 (docs/eks.md)."""
    y = np.asarray(datasets.load("sunspots").y, float)[:-40]
    z = (y - y.mean()) / y.std()
    out = {}
    for radius in (None, 0.99):
        fit = fit_nested(jax.random.key(0), y=z, state_dim=2, num_centres=5, lds_iters=100,
                         rbf_iters=100, progress_bar=False, max_spectral_radius=radius)  # fmt: skip
        A, b = np.asarray(fit.rbf.params["A"]), np.asarray(fit.rbf.params["b"])
        x, sizes = 5.0 * np.ones(2), []
        for _ in range(200):
            x = A @ np.asarray(rbf_features(jnp.asarray(x), fit.centres, fit.widths)) + b
            sizes.append(np.linalg.norm(x))
        out[radius] = (rho(A[:, -2:]), np.array(sizes))
    r_free, s_free = out[None]
    r_bound, s_bound = out[0.99]
    assert r_free > 1.0 and s_free[99] > 1e6
    assert not np.isfinite(s_free[-1]) or s_free[-1] > 1e12
    assert r_bound <= 0.99 + 1e-12
    assert np.all(np.isfinite(s_bound)) and s_bound[100:].max() < s_bound[:100].max()
