"""Gaussian feature moments (ppl_dyn.infer.feature_moments) against Monte Carlo, the
paper's joint-space information form (algorithms.md §6.6) and exact special cases.

Monte Carlo checks use a standard-error tolerance: |analytic - MC| <= Z_TOL * se per
component (plus a tiny floor for components that are constant under the cloud).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_dyn.infer.feature_moments import FeatureMoments, cross_moment, feature_moments
from ppl_dyn.models.rbf import rbf_features
from ppl_dyn.state_space import Regression

Z_TOL = 4.5
N_MC = 250_000

C2 = np.array([[0.0, 0.0], [1.0, -0.5], [-1.0, 1.0]])
W2 = np.array([0.5, 0.8, 1.2])
C1 = np.array([[-1.0], [0.2], [1.5]])
W1 = np.array([0.4, 0.7, 1.0])
G2 = np.array([[0.7, -0.4], [0.2, 1.1]])  # z = m_z + G (x - m) + noise, dz = 2
G1 = np.array([[0.9], [-0.6]])
RH = np.diag([0.5, 0.3])  # noise factor of z | x


def rbf_reg(dx):  # centres/widths as in algorithms.md §6.7 (3 RBFs, different widths)
    c, w = (C1, W1) if dx == 1 else (C2, W2)
    return Regression("W", "Q", feature="rbf", feature_args=(jnp.asarray(c), jnp.asarray(w)))


RBF1, RBF2 = rbf_reg(1), rbf_reg(2)
TANH = Regression("W", "Q", feature="tanh")
LINEAR = Regression("W", "Q", feature="linear")

# clouds given by a factor Lx of P = Lx Lx^T (exact zero rows = zero-variance coordinates)
RBF2_CLOUDS = {
    "near": ([0.3, -0.2], [[0.6, 0.0], [0.15, 0.4]]),
    "broad": ([0.5, 0.5], [[1.0, 0.0], [-0.3, 0.7]]),
    "between": ([-0.5, 1.5], [[0.3, 0.0], [0.25, 0.2]]),
    "far": ([3.5, -3.0], [[0.03, 0.0], [0.01, 0.02]]),
    "zero_var_x2": ([0.2, 0.4], [[0.5, 0.0], [0.0, 0.0]]),
}
RBF1_CLOUDS = {
    "near": ([0.1], [[0.7]]),
    "narrow": ([-0.6], [[0.2]]),
    "far": ([4.0], [[0.02]]),
}
TANH2_CLOUDS = {
    "correlated": ([0.4, -0.3], [[0.9, 0.0], [0.6, 0.5]]),
    "strong": ([-0.8, 1.2], [[1.5, 0.0], [1.4, 0.3]]),
    "rank1": ([0.3, 0.1], [[0.8, 0.0], [-0.8, 0.0]]),  # |r| = 1
    "zero_var_x1": ([0.5, -0.2], [[0.0, 0.0], [0.0, 0.9]]),
}


def joint(m, Lx, G, observed=False):
    """(m, P, m_z, C_zx) of x ~ N(m, Lx Lx^T), z = m_z + G (x - m) + RH eps."""
    m, Lx = np.asarray(m, float), np.asarray(Lx, float)
    P = Lx @ Lx.T
    m_z = np.array([0.8, -1.3])
    C_zx = np.zeros((2, len(m))) if observed else G @ P
    return m, P, m_z, C_zx


_MC = {}


def make_mc(reg):
    """Jitted MC: sample means and standard errors of phi, phi phi^T, J_phi, z phi^T."""
    if id(reg) not in _MC:
        _MC[id(reg)] = (reg, _make_mc(reg))
    return _MC[id(reg)][1]


def _make_mc(reg):
    f = reg.features

    @jax.jit
    def mc(key, m, Lx, m_z, G, Rh):
        k1, k2 = jax.random.split(key)
        e = jax.random.normal(k1, (N_MC, m.shape[0]), m.dtype)
        dxs = e @ Lx.T
        x = m + dxs
        z = m_z + dxs @ G.T + jax.random.normal(k2, (N_MC, m_z.shape[0]), m.dtype) @ Rh.T
        phi = f(x)
        vals = {
            "mean": phi,
            "second": phi[:, :, None] * phi[:, None, :],
            "jac": jax.vmap(jax.jacfwd(f))(x),
            "cross": z[:, :, None] * phi[:, None, :],
        }
        return {k: (v.mean(0), v.std(0) / math.sqrt(N_MC)) for k, v in vals.items()}

    return mc


def zscores(analytic, mc):
    """Per-component |z| and whether every component passes the tolerance."""
    a, (mu, se) = np.asarray(analytic), (np.asarray(mc[0]), np.asarray(mc[1]))
    diff = np.abs(a - mu)
    ok = diff <= Z_TOL * se + 1e-10 * np.abs(a) + 1e-300
    varies = se > 1e-12 * np.abs(a)  # else the component is constant under the cloud
    z = np.where(varies, diff / np.where(varies, se, 1.0), 0.0)
    return z, bool(ok.all())


_JITTED = {}


def fmj(reg, m, P):
    """feature_moments, jitted once per regression (eager dispatch is much slower)."""
    if id(reg) not in _JITTED:
        _JITTED[id(reg)] = (reg, jax.jit(lambda m, P: feature_moments(reg, m, P)))
    return _JITTED[id(reg)][1](jnp.asarray(m), jnp.asarray(P))


def analytic(reg, m, P, m_z, C_zx):
    fm = fmj(reg, m, P)
    return {
        "mean": fm.mean,
        "second": fm.second,
        "jac": fm.jac,
        "cross": cross_moment(fm, jnp.asarray(m_z), jnp.asarray(C_zx)),
    }


def check_against_mc(reg, clouds, G, seed, observed=False):
    mc_fn = make_mc(reg)
    worst = {}
    for i, (name, (m, Lx)) in enumerate(clouds.items()):
        m, P, m_z, C_zx = joint(m, Lx, G, observed)
        Gs = np.zeros_like(G) if observed else G
        Rh = np.zeros_like(RH) if observed else RH
        mc = mc_fn(jax.random.PRNGKey(seed + i), m, np.asarray(Lx, float), m_z, Gs, Rh)
        an = analytic(reg, m, P, m_z, C_zx)
        for k in an:
            assert np.all(np.isfinite(an[k])), (name, k)
            z, ok = zscores(an[k], mc[k])
            worst[k] = max(worst.get(k, 0.0), float(z.max()))
            assert ok, f"{name}: {k} max|z| = {z.max():.2f}"
    print(f"\n{reg.feature} dx={len(m)} observed={observed} max|z|:", worst)
    return worst


# --------------------------------------------------------------------------------------
# 1./2. Monte Carlo (regular and singular clouds)
# --------------------------------------------------------------------------------------


def test_rbf_dx2_monte_carlo():
    check_against_mc(RBF2, RBF2_CLOUDS, G2, seed=0)


def test_rbf_dx1_monte_carlo():
    check_against_mc(RBF1, RBF1_CLOUDS, G1, seed=10)


def test_tanh_dx2_monte_carlo():
    check_against_mc(TANH, TANH2_CLOUDS, G2, seed=20)


def test_z_observed_exactly():
    """Emission cloud (algorithms.md §5.3): z = y observed, C_zx = 0, C_zz = 0."""
    clouds = {k: RBF2_CLOUDS[k] for k in ("near", "zero_var_x2")}
    check_against_mc(RBF2, clouds, G2, seed=30, observed=True)
    check_against_mc(TANH, {"zero_var_x1": TANH2_CLOUDS["zero_var_x1"]}, G2, 31, True)


@pytest.mark.parametrize("reg", [RBF1, RBF2, TANH, LINEAR], ids=lambda r: r.feature)
def test_zero_cloud_gives_point_values(reg):
    dx = reg.feature_args[0].shape[1] if reg.feature == "rbf" else 2
    m = jnp.linspace(-0.7, 0.9, dx)
    fm = fmj(reg, m, jnp.zeros((dx, dx)))
    phi, jac = jax.jit(lambda m: (reg.features(m), jax.jacfwd(reg.features)(m)))(m)
    np.testing.assert_allclose(fm.mean, phi, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fm.second, jnp.outer(phi, phi), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fm.jac, jac, rtol=1e-13, atol=1e-15)
    m_z = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(cross_moment(fm, m_z, jnp.zeros((2, dx))), jnp.outer(m_z, phi))


# --------------------------------------------------------------------------------------
# 3. Negative controls: wrong formulas must fail the same MC check
# --------------------------------------------------------------------------------------


def test_negative_controls_fail():
    reg = RBF2
    m, Lx = RBF2_CLOUDS["near"]
    m, P, m_z, C_zx = joint(m, Lx, G2)
    mc = make_mc(reg)(jax.random.PRNGKey(40), m, np.asarray(Lx), m_z, G2, RH)
    fm = fmj(reg, m, P)

    # <rho_i> without P: N(m; c_i, S_i) = rho_i(m)
    wrong_mean = rbf_features(jnp.asarray(m), jnp.asarray(C2), jnp.asarray(W2))
    z_rho, ok_rho = zscores(wrong_mean, mc["mean"])
    # <z phi^T> without the C_zx term
    z_cross, ok_cross = zscores(cross_moment(fm, m_z, np.zeros_like(C_zx)), mc["cross"])
    print(f"\nnegative controls: drop P in <rho>: |z|={z_rho.max():.0f}; ", end="")
    print(f"drop C_zx: |z|={z_cross.max():.0f}")
    assert not ok_rho and z_rho.max() > 50
    assert not ok_cross and z_cross.max() > 50
    # ... while the right ones pass on the same draws
    assert zscores(fm.mean, mc["mean"])[1]
    assert zscores(cross_moment(fm, m_z, C_zx), mc["cross"])[1]


# --------------------------------------------------------------------------------------
# 4. Algebraic oracle: the paper's joint-space information form (algorithms.md §6.6)
# --------------------------------------------------------------------------------------


def _paper_form(mu, C, c_list, Sinv_list):
    """<prod_k rho_k> and the tilted joint mean for RBFs with precisions Sinv_list."""
    dx = c_list[0].shape[0]
    n = mu.shape[0]
    Cinv = np.linalg.inv(C)
    A = np.zeros((n, n))
    h = Cinv @ mu
    delta = mu @ Cinv @ mu
    logconst = -0.5 * np.linalg.slogdet(C)[1]
    for c, Sinv in zip(c_list, Sinv_list, strict=True):
        A[:dx, :dx] += Sinv
        h[:dx] += Sinv @ c
        delta += c @ Sinv @ c
        logconst += -0.5 * dx * np.log(2 * np.pi) + 0.5 * np.linalg.slogdet(Sinv)[1]
    Ct = np.linalg.inv(Cinv + A)
    mut = Ct @ h
    delta -= mut @ (Cinv + A) @ mut
    return np.exp(logconst + 0.5 * np.linalg.slogdet(Ct)[1] - 0.5 * delta), mut


def test_paper_information_form():
    reg = RBF2
    for name in ("near", "broad", "between"):
        m, Lx = RBF2_CLOUDS[name]
        m, P, m_z, C_zx = joint(m, Lx, G2)
        mu = np.concatenate([m, m_z])
        C = np.block([[P, C_zx.T], [C_zx, G2 @ P @ G2.T + RH @ RH.T]])
        fm = fmj(reg, m, P)
        x_phi = np.asarray(cross_moment(fm, jnp.asarray(m), jnp.asarray(P)))
        z_phi = np.asarray(cross_moment(fm, jnp.asarray(m_z), jnp.asarray(C_zx)))
        Sinv = [np.eye(2) / w**2 for w in W2]
        for i in range(3):
            beta, mut = _paper_form(mu, C, [C2[i]], [Sinv[i]])
            np.testing.assert_allclose(fm.mean[i], beta, rtol=1e-10)
            np.testing.assert_allclose(x_phi[:, i], beta * mut[:2], rtol=1e-10)
            np.testing.assert_allclose(z_phi[:, i], beta * mut[2:], rtol=1e-10)
            for j in range(3):
                pair, _ = _paper_form(mu, C, [C2[i], C2[j]], [Sinv[i], Sinv[j]])
                np.testing.assert_allclose(fm.second[i, j], pair, rtol=1e-10)


def test_stein_reproduces_boxed_rbf_formulas():
    """cross_moment gives beta_i [m + P (P+S_i)^{-1} (c_i - m)] (algorithms.md §6.5)."""
    reg = RBF2
    m, Lx = RBF2_CLOUDS["between"]
    m, P, m_z, C_zx = joint(m, Lx, G2)
    fm = fmj(reg, m, P)
    for i in range(3):
        K = np.linalg.solve(P + W2[i] ** 2 * np.eye(2), C2[i] - m)
        beta = fm.mean[i]
        np.testing.assert_allclose(fm.second[3:, i], beta * (m + P @ K), rtol=1e-12)
        np.testing.assert_allclose(cross_moment(fm, m_z, C_zx)[:, i], beta * (m_z + C_zx @ K))


# --------------------------------------------------------------------------------------
# 5.-7. Linear exactness, float32, vmap, errors
# --------------------------------------------------------------------------------------


def test_linear_is_exact():
    m = jnp.array([0.3, -1.0, 2.0])
    L = jnp.array([[1.0, 0, 0], [0.5, 0.2, 0], [0, 0, 0]])
    P = L @ L.T
    fm = fmj(LINEAR, m, P)
    np.testing.assert_allclose(fm.mean, m)
    np.testing.assert_allclose(fm.second, P + jnp.outer(m, m), rtol=1e-15)
    np.testing.assert_array_equal(fm.jac, jnp.eye(3))
    C_zx = jnp.ones((2, 3))
    np.testing.assert_allclose(cross_moment(fm, m[:2], C_zx), jnp.outer(m[:2], m) + C_zx)


@pytest.mark.parametrize("reg", [RBF2, TANH, LINEAR], ids=lambda r: r.feature)
@pytest.mark.parametrize("cloud", ["near", "zero", "singular"])
def test_float32(reg, cloud):
    m = np.array([0.3, -0.2])
    P = {
        "near": np.array([[0.4, 0.1], [0.1, 0.2]]),
        "zero": np.zeros((2, 2)),
        "singular": np.array([[0.5, 0.0], [0.0, 0.0]]),
    }[cloud]
    fm32 = fmj(reg, jnp.asarray(m, jnp.float32), jnp.asarray(P, jnp.float32))
    fm64 = fmj(reg, m, P)
    for a32, a64 in zip(fm32, fm64, strict=True):
        assert a32.dtype == jnp.float32
        assert np.all(np.isfinite(a32))
        np.testing.assert_allclose(a32, a64, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("reg", [RBF2, TANH, LINEAR], ids=lambda r: r.feature)
def test_vmap_and_jit(reg):
    key = jax.random.PRNGKey(50)
    ms = jax.random.normal(key, (6, 2))
    Ls = 0.5 * jax.random.normal(jax.random.PRNGKey(51), (6, 2, 2))
    Ps = (Ls @ jnp.swapaxes(Ls, -1, -2)).at[0].set(0.0).at[1, 1, :].set(0.0).at[1, :, 1].set(0.0)
    batched = jax.jit(jax.vmap(lambda m, P: feature_moments(reg, m, P)))(ms, Ps)
    assert isinstance(batched, FeatureMoments)
    for t in range(6):
        one = fmj(reg, ms[t], Ps[t])
        for b, o in zip(batched, one, strict=True):
            assert np.all(np.isfinite(b[t]))
            np.testing.assert_allclose(b[t], o, rtol=1e-12, atol=1e-14)


def test_unknown_feature():
    with pytest.raises(ValueError, match="softplus"):
        feature_moments(Regression("W", "Q", feature="softplus"), jnp.zeros(2), jnp.eye(2))
