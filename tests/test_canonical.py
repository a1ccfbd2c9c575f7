"""Controllable canonical form, the Pac-Man condition, its projection, projected GD.

Oracles: numpy polynomials and matrix powers, brute-force root computation, a closed-form
margin, Monte Carlo with a standard error, and scipy's NNLS / SLSQP for the projection.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize, nnls

from ppl_dyn import canonical as cn

TRUE = cn.CanonicalParams(jnp.array([0.1, 0.35]), jnp.array([1.0, -0.6]), jnp.asarray(0.3))


def random_system(rng, n, scale=0.3):
    return cn.CanonicalParams(
        jnp.asarray(rng.normal(size=n) * scale),
        jnp.asarray(rng.normal(size=n)),
        jnp.asarray(rng.normal()),
    )


# ----------------------------------------------------------------------------- the form


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_companion_matrix_characteristic_polynomial_matches_np_poly(n):
    p = random_system(np.random.default_rng(n), n)
    A, B, C, D = cn.canonical_matrices(*p)
    assert A.shape == (n, n) and B.shape == (n, 1) and C.shape == (1, n) and D.shape == (1, 1)
    np.testing.assert_allclose(np.poly(np.asarray(A)), np.r_[1.0, p.a], atol=1e-12)
    np.testing.assert_array_equal(np.asarray(B[:, 0]), np.eye(n)[-1])


def test_impulse_response_matches_simulated_impulse_and_matrix_powers():
    p = random_system(np.random.default_rng(0), 4)
    K = 30
    impulse = jnp.zeros(K).at[0].set(1.0)
    h = cn.impulse_response(p, K)
    np.testing.assert_allclose(h, cn.simulate_outputs(p, impulse), atol=1e-13)
    A, B, C, D = (np.asarray(m) for m in cn.canonical_matrices(*p))
    powers = [D[0, 0]] + [(C @ np.linalg.matrix_power(A, k) @ B)[0, 0] for k in range(K - 1)]
    np.testing.assert_allclose(h, powers, atol=1e-13)
    np.testing.assert_allclose(cn.markov_parameters(p.a, p.c, K - 1), powers[1:], atol=1e-13)


def test_transfer_function_matches_resolvent():
    p = random_system(np.random.default_rng(1), 3)
    A, B, C, D = (np.asarray(m) for m in cn.canonical_matrices(*p))
    z = np.exp(1j * np.linspace(0.1, 6.0, 7)) * 1.3
    direct = [D[0, 0] + (C @ np.linalg.solve(zk * np.eye(3) - A, B))[0, 0] for zk in z]
    np.testing.assert_allclose(cn.transfer_function(p, jnp.asarray(z)), direct, atol=1e-12)


def test_fft_risk_matches_scan_simulation_and_batch_matches_loop():
    p = random_system(np.random.default_rng(2), 3)
    u, y = cn.sample_data(jax.random.key(0), p, num_sequences=3, num_steps=40, noise_std=0.5)
    q = random_system(np.random.default_rng(3), 3)
    pred = cn.simulate_outputs(q, u)
    np.testing.assert_allclose(pred[1], cn.simulate_outputs(q, u[1]), atol=1e-13)
    np.testing.assert_allclose(cn.empirical_risk(q, u, y), np.mean((pred - y) ** 2), rtol=1e-12)
    mask = jnp.ones_like(y).at[:, :10].set(0.0)
    np.testing.assert_allclose(
        cn.empirical_risk(q, u, y, mask=mask), np.mean((pred - y)[:, 10:] ** 2), rtol=1e-12
    )
    # masked entries may be missing (NaN): value and gradient stay finite
    y_nan = y.at[:, :10].set(jnp.nan)
    value, grad = jax.value_and_grad(cn.empirical_risk)(q, u, y_nan, mask=mask)
    np.testing.assert_allclose(value, np.mean((pred - y)[:, 10:] ** 2), rtol=1e-12)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad)


def test_population_risk_matches_monte_carlo():
    p, q, T, sigma = TRUE, random_system(np.random.default_rng(4), 3), 15, 0.4
    u, y = cn.sample_data(jax.random.key(1), p, num_sequences=20000, num_steps=T, noise_std=sigma)
    per_seq = np.mean((np.asarray(cn.simulate_outputs(q, u)) - np.asarray(y)) ** 2, axis=1)
    se = per_seq.std() / np.sqrt(per_seq.size)
    exact = float(cn.population_risk(q, p, T, noise_std=sigma))
    assert abs(per_seq.mean() - exact) < 5 * se


# ------------------------------------------------------------------ Pac-Man condition


def brute_force_margin(a, num_points=1 << 15):
    """min over the circle of Re q - |Im q| with q(z) = p_a(z) / z^n, via np.polyval."""
    z = np.exp(2j * np.pi * np.arange(num_points) / num_points)
    q = np.polyval(np.r_[1.0, a], z) / z ** len(a)
    return np.min(q.real - np.abs(q.imag))


def test_zero_polynomial_is_the_centre_of_the_region():
    check = cn.check_pacman(jnp.zeros(5))
    assert bool(check.satisfied) and float(check.margin) == pytest.approx(1.0)


@pytest.mark.parametrize("r", [0.3, 0.7, 0.71, -0.72, 1.2])
def test_margin_of_one_coefficient_has_closed_form(r):
    # q = 1 + r e^{-i theta}: min (1 + r cos - |r sin|) = 1 - sqrt(2) |r| (at theta = 3pi/4)
    check = cn.check_pacman(jnp.array([r, 0.0]))
    assert float(check.margin) == pytest.approx(1 - np.sqrt(2) * abs(r), abs=1e-12)
    assert bool(check.satisfied) == (abs(r) < np.sqrt(0.5))


def test_l1_ball_of_radius_sqrt2_over_2_satisfies_condition():
    rng = np.random.default_rng(5)
    for n in (2, 5, 9):
        a = rng.normal(size=(50, n))
        a *= 0.999 * np.sqrt(0.5) / np.abs(a).sum(axis=1, keepdims=True)
        assert all(bool(cn.check_pacman(jnp.asarray(x)).satisfied) for x in a)


def test_check_matches_brute_force_and_implies_stability():
    rng = np.random.default_rng(6)
    num_satisfied = 0
    for _ in range(120):
        n = int(rng.integers(1, 7))
        a = rng.normal(size=n) * rng.choice([0.2, 0.5, 1.0])
        check = cn.check_pacman(jnp.asarray(a))
        brute = brute_force_margin(a)
        bound = float(cn.pacman_margin_bound(jnp.asarray(a)))
        assert bound - 1e-12 <= brute <= float(check.margin) + 1e-12
        assert abs(float(check.margin) - brute) < 1e-3
        radius = np.max(np.abs(np.roots(np.r_[1.0, a])))
        if bool(check.satisfied):
            num_satisfied += 1
            assert radius < 1.0
        if radius >= 1.0:
            assert not bool(check.satisfied)
    assert 15 < num_satisfied < 105  # both outcomes exercised


def test_root_outside_unit_disk_fails_condition():
    a = np.poly([1.05, 0.2, -0.3])[1:]
    assert not bool(cn.check_pacman(jnp.asarray(a)).satisfied)
    a = np.poly([0.5 + 0.5j, 0.5 - 0.5j])[1:].real  # stable, but not Pac-Man
    assert np.max(np.abs(np.roots(np.r_[1.0, a]))) < 1.0
    assert not bool(cn.check_pacman(jnp.asarray(a)).satisfied)


# ------------------------------------------------------------------------ projection


def scipy_projection_nnls(a0, G, h):
    """min ||x|| s.t. G x >= h - G a0 (least-distance programming) through NNLS."""
    g = h - G @ a0
    E = np.vstack([G.T, g[None, :]])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    w, _ = nnls(E, f, maxiter=100 * E.shape[1])
    r = E @ w - f
    return a0 - r[:-1] / r[-1]


def scipy_projection_slsqp(a0, G, h):
    res = minimize(
        lambda x: 0.5 * np.sum((x - a0) ** 2),
        np.zeros_like(a0),
        jac=lambda x: x - a0,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda x: G @ x - h, "jac": lambda x: G}],
        # ftol 1e-12: at 1e-14 scipy 1.17 reaches the point (to 2e-14) and then reports
        # "positive directional derivative for linesearch" (success False) in one case
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("n,num_points,margin", [(2, 64, 0.0), (3, 128, 0.05), (5, 256, 0.1)])
def test_projection_is_closest_point_feasible_and_idempotent(n, num_points, margin):
    rng = np.random.default_rng(n)
    G, h = cn.pacman_polytope(n, margin=margin, num_points=num_points)
    Gn, hn = np.asarray(G), np.asarray(h)

    def project(a):  # jitted inside
        return cn.project_pacman(a, margin=margin, num_points=num_points)

    for _ in range(4):
        a0 = rng.normal(size=n) * 1.5
        a = np.asarray(project(jnp.asarray(a0)))
        assert np.min(Gn @ a - hn) > -1e-9  # lands in the set
        np.testing.assert_allclose(a, scipy_projection_nnls(a0, Gn, hn), atol=1e-8)
        np.testing.assert_allclose(a, scipy_projection_slsqp(a0, Gn, hn), atol=1e-6)
        np.testing.assert_allclose(project(jnp.asarray(a)), a, atol=1e-9)  # idempotent
    inside = jnp.asarray(rng.normal(size=n) * 0.05)
    np.testing.assert_array_equal(project(inside), inside)  # feasible points stay put
    # jit-compatible: inside a user's jit it gives the same point
    jitted = jax.jit(lambda a: cn.project_polytope(a, G, h))
    np.testing.assert_allclose(jitted(jnp.asarray(a0)), project(jnp.asarray(a0)), atol=1e-12)


def test_projection_with_margin_satisfies_continuous_condition():
    rng = np.random.default_rng(7)
    for _ in range(5):
        a = cn.project_pacman(jnp.asarray(rng.normal(size=4) * 2.0), margin=0.05)
        assert float(cn.pacman_margin_bound(a)) > 0.0
        assert brute_force_margin(np.asarray(a)) > 0.04


# ---------------------------------------------------------------------- learning


def test_projected_gd_recovers_impulse_response_noiseless():
    u, y = cn.sample_data(jax.random.key(2), TRUE, num_sequences=4, num_steps=60)
    h_true = cn.impulse_response(TRUE, 40)
    fit = cn.fit_canonical(u, y, 2, num_iters=1500, learning_rate=0.1, margin=0.02)
    assert fit.losses.shape == (1501,)
    assert float(fit.losses[-1]) < 1e-20
    np.testing.assert_allclose(cn.impulse_response(fit.params, 40), h_true, atol=1e-9)
    np.testing.assert_allclose(fit.params.a, TRUE.a, atol=1e-9)  # identified at order n
    # over-parameterised: order 4 > 2, same transfer function, a still admissible
    fit4 = cn.fit_canonical(u, y, 4, num_iters=1500, learning_rate=0.1, margin=0.02)
    np.testing.assert_allclose(cn.impulse_response(fit4.params, 40), h_true, atol=1e-6)
    assert bool(cn.check_pacman(fit4.params.a).satisfied)


def test_population_gd_loss_decreases_to_zero_and_equals_generic_loop():
    fit = cn.fit_canonical_population(TRUE, 2, 50, num_iters=800, learning_rate=0.1)
    assert float(fit.losses[-1]) < 1e-12 * float(fit.losses[0])
    np.testing.assert_allclose(
        cn.impulse_response(fit.params, 30), cn.impulse_response(TRUE, 30), atol=1e-7
    )
    # the same run through the generic loop (user loss and projection)
    G, h = cn.pacman_polytope(2)
    zero = cn.CanonicalParams(jnp.zeros(2), jnp.zeros(2), jnp.zeros(()))
    generic = cn.projected_gradient_descent(
        lambda p: cn.population_risk(p, TRUE, 50),
        zero,
        num_iters=800,
        optimizer=optax.sgd(0.1),
        project=lambda a: cn.project_polytope(a, G, h),
    )
    np.testing.assert_allclose(generic.losses, fit.losses, rtol=1e-9, atol=1e-25)
    np.testing.assert_allclose(generic.params.a, fit.params.a, atol=1e-12)


# ---------------------------------------------------------------------- bad input


def test_bad_shapes_raise_naming_the_argument():
    a, c = jnp.zeros(2), jnp.zeros(2)
    with pytest.raises(ValueError, match=r"\ba\b"):
        cn.canonical_matrices(jnp.zeros((2, 2)), c, 0.0)
    with pytest.raises(ValueError, match=r"\bc\b"):
        cn.canonical_matrices(a, jnp.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"\bd\b"):
        cn.canonical_matrices(a, c, jnp.zeros(2))
    with pytest.raises(ValueError, match="params.c"):
        cn.impulse_response(cn.CanonicalParams(a, jnp.zeros(1), 0.0), 5)
    with pytest.raises(ValueError, match="num_lags"):
        cn.impulse_response(cn.CanonicalParams(a, c, 0.0), 0)
    with pytest.raises(ValueError, match=r"\bu\b"):
        cn.simulate_outputs(TRUE, jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\by\b"):
        cn.fit_canonical(jnp.zeros((2, 10)), jnp.zeros((2, 9)), 2, num_iters=1)
    with pytest.raises(ValueError, match="mask"):
        cn.empirical_risk(TRUE, jnp.zeros(10), jnp.zeros(10), mask=jnp.ones(9))
    with pytest.raises(ValueError, match=r"\ba\b"):
        cn.project_pacman(jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\ba\b"):
        cn.check_pacman(jnp.zeros(0))
    with pytest.raises(ValueError, match="num_points"):
        cn.pacman_polytope(4, num_points=8)
    with pytest.raises(ValueError, match="order"):
        cn.fit_canonical(jnp.zeros(10), jnp.zeros(10), 0, num_iters=1)
    with pytest.raises(ValueError, match="init_params"):
        cn.fit_canonical(jnp.zeros(10), jnp.zeros(10), 3, num_iters=1, init_params=TRUE)
    with pytest.raises(ValueError, match="rng_key"):
        cn.sample_data(None, TRUE, num_sequences=1, num_steps=3)
