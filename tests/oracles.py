"""Independent oracles for the LDS tests.

Nothing here calls ppl_dyn's Kalman / M-step code. The dense oracle builds the joint
Gaussian of ``(x_{1:T}, y_{1:T})`` explicitly in the form

    x = M (w + a),   w ~ N(0, blockdiag(P0, Q, ..., Q)),   a = (m0, c_2, ..., c_T),
    y = (I_T (x) C) x + e + v,   v ~ N(0, I_T (x) R),

with ``M[t, s] = A^(t-s)`` for ``s <= t`` (block lower-triangular), ``c_t = B u_t + b``
and ``e_t = D u_t + d``, and answers every question by Gaussian conditioning with
numpy / scipy (Cholesky solves of the observed block).

Parameter dictionaries use the LDS site names (``A, C, Q, R, m0, P0`` and optionally
``B, D, b, d``); a 1-D ``Q``/``R``/``P0`` is a vector of variances ("diag" sites).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.linalg as sla

LOG2PI = np.log(2.0 * np.pi)

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def as_cov(v):
    """A covariance matrix from a full matrix or a vector of variances (numpy)."""
    v = np.asarray(v, dtype=float)
    return np.diag(v) if v.ndim == 1 else v


def _offsets(params, T, u, dim, weight, bias):
    out = np.zeros((T, dim))
    if u is not None and np.shape(u)[-1] > 0:
        out = out + np.asarray(u, float) @ np.asarray(params[weight], float).T
    if params.get(bias) is not None:
        out = out + np.asarray(params[bias], float)
    return out


def transition_offsets(params, T, u=None):
    """``c_t = B u_t + b`` for every t (row 0 is unused by the model)."""
    dx = np.shape(params["A"])[0]
    return _offsets(params, T, u, dx, "B", "b")


def emission_offsets(params, T, u=None):
    """``e_t = D u_t + d``."""
    dy = np.shape(params["C"])[0]
    return _offsets(params, T, u, dy, "D", "d")


# --------------------------------------------------------------------------------------
# the dense joint Gaussian
# --------------------------------------------------------------------------------------


def dense_joint(params, T, u=None):
    """Mean and covariance of ``z = (x_1..x_T, y_1..y_T)`` (time-major blocks).

    Returns ``(mu, Sigma, dx, dy)`` with ``mu`` of length ``T*(dx+dy)``; the first
    ``T*dx`` entries are the states.
    """
    A = np.asarray(params["A"], float)
    C = np.asarray(params["C"], float)
    Q, R, P0 = as_cov(params["Q"]), as_cov(params["R"]), as_cov(params["P0"])
    m0 = np.asarray(params["m0"], float)
    dx, dy = A.shape[0], C.shape[0]
    c = transition_offsets(params, T, u)
    e = emission_offsets(params, T, u)

    # M[t, s] = A^(t-s), s <= t
    powers = [np.eye(dx)]
    for _ in range(T - 1):
        powers.append(A @ powers[-1])
    M = np.zeros((T * dx, T * dx))
    for t in range(T):
        for s in range(t + 1):
            M[t * dx : (t + 1) * dx, s * dx : (s + 1) * dx] = powers[t - s]
    W = sla.block_diag(P0, *([Q] * (T - 1)))
    a = np.concatenate([m0] + [c[t] for t in range(1, T)])
    mu_x = M @ a
    Sxx = M @ W @ M.T
    Cbig = np.kron(np.eye(T), C)
    mu_y = Cbig @ mu_x + e.reshape(-1)
    Sxy = Sxx @ Cbig.T
    Syy = Cbig @ Sxx @ Cbig.T + np.kron(np.eye(T), R)
    mu = np.concatenate([mu_x, mu_y])
    Sigma = np.block([[Sxx, Sxy], [Sxy.T, Syy]])
    Sigma = 0.5 * (Sigma + Sigma.T)
    return mu, Sigma, dx, dy


def dense_log_marginal(params, y, u=None):
    """``log p(y_o)`` over the observed (non-NaN) entries of one sequence ``(T, dy)``."""
    y = np.asarray(y, float)
    T = y.shape[0]
    mu, Sigma, dx, dy = dense_joint(params, T, u)
    yv = y.reshape(-1)
    o = ~np.isnan(yv)
    if not o.any():
        return 0.0
    iy = T * dx + np.flatnonzero(o)
    S_oo = Sigma[np.ix_(iy, iy)]
    L = np.linalg.cholesky(S_oo)
    z = sla.solve_triangular(L, yv[o] - mu[iy], lower=True)
    return float(-0.5 * (z @ z + 2 * np.sum(np.log(np.diag(L))) + o.sum() * LOG2PI))


def dense_posterior(params, y, u=None):
    """Posterior moments of one sequence by conditioning the dense joint Gaussian.

    Returns a dict with
        ``means (T, dx)``, ``covs (T, dx, dx)``, ``cross (T-1, dx, dx)`` =
        ``Cov[x_{t+1}, x_t | y_o]``, ``log_marginal``, and the posterior moments of the
        full observation vector (missing entries imputed): ``Ey (T, dy)``,
        ``Cyx (T, dy, dx)`` = ``Cov[y_t, x_t | y_o]``, ``Cyy (T, dy, dy)``.
    """
    y = np.asarray(y, float)
    T = y.shape[0]
    mu, Sigma, dx, dy = dense_joint(params, T, u)
    yv = y.reshape(-1)
    o = ~np.isnan(yv)
    iy = T * dx + np.flatnonzero(o)
    if o.any():
        cf = sla.cho_factor(Sigma[np.ix_(iy, iy)], lower=True)
        S_zo = Sigma[:, iy]
        mean = mu + S_zo @ sla.cho_solve(cf, yv[o] - mu[iy])
        cov = Sigma - S_zo @ sla.cho_solve(cf, S_zo.T)
        cov = 0.5 * (cov + cov.T)
        ll = dense_log_marginal(params, y, u)
    else:
        mean, cov, ll = mu.copy(), Sigma.copy(), 0.0
    nx = T * dx
    mx = mean[:nx].reshape(T, dx)
    my = mean[nx:].reshape(T, dy)

    def xblk(t, s):
        return cov[t * dx : (t + 1) * dx, s * dx : (s + 1) * dx]

    def yblk(t, s):
        return cov[nx + t * dy : nx + (t + 1) * dy, nx + s * dy : nx + (s + 1) * dy]

    def yxblk(t):
        return cov[nx + t * dy : nx + (t + 1) * dy, t * dx : (t + 1) * dx]

    return dict(
        means=mx,
        covs=np.stack([xblk(t, t) for t in range(T)]),
        cross=np.array([xblk(t + 1, t) for t in range(T - 1)]).reshape(T - 1, dx, dx),
        log_marginal=ll,
        Ey=my,
        Cyx=np.stack([yxblk(t) for t in range(T)]),
        Cyy=np.stack([yblk(t, t) for t in range(T)]),
    )


def prior_moments(params, T, u=None):
    """Prior (unconditioned) means and covariances of the states ``x_t``."""
    mu, Sigma, dx, _ = dense_joint(params, T, u)
    means = mu[: T * dx].reshape(T, dx)
    covs = np.stack([Sigma[t * dx : (t + 1) * dx, t * dx : (t + 1) * dx] for t in range(T)])
    cross = [Sigma[(t + 1) * dx : (t + 2) * dx, t * dx : (t + 1) * dx] for t in range(T - 1)]
    return means, covs, np.array(cross).reshape(T - 1, dx, dx)


# --------------------------------------------------------------------------------------
# random systems
# --------------------------------------------------------------------------------------


def scalar_lds_params():
    """A fresh dict of parameters of a 1-d LDS with offsets (A 0.9, Q = R = 0.5), shared by
    the particle-method tests."""
    return dict(
        A=np.array([[0.9]]),
        C=np.array([[1.0]]),
        Q=np.array([[0.5]]),
        R=np.array([[0.5]]),
        m0=np.array([0.3]),
        P0=np.array([[1.0]]),
        b=np.array([0.1]),
        d=np.array([-0.2]),
    )


def random_pd(rng, dim, scale=1.0, cond=None):
    """A random symmetric positive definite matrix; ``cond`` fixes its condition number."""
    G = rng.normal(size=(dim, dim))
    Qm, _ = np.linalg.qr(G)
    if cond is None:
        lam = scale * rng.uniform(0.3, 1.5, size=dim)
    else:
        lam = scale * np.geomspace(1.0, 1.0 / cond, dim) if dim > 1 else np.array([scale])
    P = (Qm * lam) @ Qm.T
    return 0.5 * (P + P.T)


def random_stable_matrix(rng, dim, rho):
    """A random square matrix with spectral radius exactly ``rho``."""
    G = rng.normal(size=(dim, dim))
    return rho * G / np.max(np.abs(np.linalg.eigvals(G)))


def random_lds_params(
    rng,
    dx,
    dy,
    rho=0.9,
    du=0,
    bias=True,
    dynamics_noise="full",
    emission_noise="full",
    init_noise="full",
):
    """Random LDS parameters with the lds model's site names (numpy float64)."""

    def cov(dim, kind, scale):
        P = random_pd(rng, dim, scale)
        return np.diag(P).copy() if kind == "diag" else P

    p = dict(
        A=random_stable_matrix(rng, dx, rho),
        C=rng.normal(size=(dy, dx)),
        Q=cov(dx, dynamics_noise, 0.5),
        R=cov(dy, emission_noise, 0.3),
        m0=rng.normal(size=dx),
        P0=cov(dx, init_noise, 1.0),
    )
    if bias:
        p["b"] = 0.5 * rng.normal(size=dx)
        p["d"] = rng.normal(size=dy)
    if du > 0:
        p["B"] = rng.normal(size=(dx, du))
        p["D"] = rng.normal(size=(dy, du))
    return p


def sample_lds(rng, params, T, u=None):
    """Draw one sequence ``(x, y)`` from the LDS by the recursion (numpy)."""
    A, C = np.asarray(params["A"]), np.asarray(params["C"])
    Q, R, P0 = as_cov(params["Q"]), as_cov(params["R"]), as_cov(params["P0"])
    dx, dy = A.shape[0], C.shape[0]
    c = transition_offsets(params, T, u)
    e = emission_offsets(params, T, u)
    x = np.zeros((T, dx))
    x[0] = rng.multivariate_normal(np.asarray(params["m0"]), P0)
    for t in range(1, T):
        x[t] = A @ x[t - 1] + c[t] + rng.multivariate_normal(np.zeros(dx), Q)
    y = x @ C.T + e + rng.multivariate_normal(np.zeros(dy), R, size=T)
    return x, y


def random_system(rng, dx, dy, rho, T, du=0, bias=True, **noise):
    """``(params, y, u)`` for a random stable LDS; ``u`` is None when ``du == 0``."""
    params = random_lds_params(rng, dx, dy, rho, du=du, bias=bias, **noise)
    u = rng.normal(size=(T, du)) if du > 0 else None
    _, y = sample_lds(rng, params, T, u)
    return params, y, u


# --------------------------------------------------------------------------------------
# the EM Q-function (Bishop, PRML section 13.3.2), written from smoothed moments
# --------------------------------------------------------------------------------------


def _cov_jnp(v):
    return jnp.diag(v) if v.ndim == 1 else v


def _gauss_expect(S, Sigma, n=1):
    """``-1/2 [n log|2 pi Sigma| + tr(Sigma^{-1} S)]`` for a sum S of n expected outer products."""
    d = Sigma.shape[-1]
    sign, logdet = jnp.linalg.slogdet(Sigma)
    val = -0.5 * (n * (d * LOG2PI + logdet) + jnp.trace(jnp.linalg.solve(Sigma, S)))
    # a covariance that is not positive definite has no density: -inf
    pd = (sign > 0) & jnp.all(jnp.linalg.eigvalsh(0.5 * (Sigma + Sigma.T)) > 0)
    return jnp.where(pd, val, -jnp.inf)


def em_q_function(params, moments, us=None):
    """Expected complete-data log-likelihood ``E[log p(x, y | params)]``.

    Args:
        params: dict of jnp arrays (LDS site names); differentiable with ``jax.grad``.
        moments: list (one per sequence) of dicts from :func:`dense_posterior`
            computed at the *old* parameters. The complete data are ``x`` and the
            missing entries of ``y``; ``Ey``, ``Cyx``, ``Cyy`` carry their moments
            (for fully observed data ``Ey = y`` and the covariances vanish).
        us: list of input arrays ``(T, du)`` per sequence, or None.

    Terms (PRML 13.3.2, eq. 13.108 with offsets/inputs added):
        E[log N(x_1 | m0, P0)] + sum_{t>=2} E[log N(x_t | A x_{t-1} + B u_t + b, Q)]
        + sum_t E[log N(y_t | C x_t + D u_t + d, R)].
    """
    A, C = params["A"], params["C"]
    Q, R, P0 = _cov_jnp(params["Q"]), _cov_jnp(params["R"]), _cov_jnp(params["P0"])
    m0 = params["m0"]
    total = 0.0
    for s, mom in enumerate(moments):
        m = jnp.asarray(mom["means"])
        P = jnp.asarray(mom["covs"])
        X = jnp.asarray(mom["cross"])  # X[t-1] = Cov[x_t, x_{t-1}]
        Ey = jnp.asarray(mom["Ey"])
        Cyx = jnp.asarray(mom["Cyx"])
        Cyy = jnp.asarray(mom["Cyy"])
        T = m.shape[0]
        u = None if us is None else us[s]
        c = jnp.zeros((T, A.shape[0]))
        e = jnp.zeros((T, C.shape[0]))
        if u is not None and "B" in params:
            c = c + jnp.asarray(u) @ params["B"].T
            e = e + jnp.asarray(u) @ params["D"].T
        if "b" in params:
            c = c + params["b"][None, :]
        if "d" in params:
            e = e + params["d"][None, :]
        # initial state: E[(x1 - m0)(x1 - m0)^T] = P_1 + (m_1 - m0)(m_1 - m0)^T
        r0 = m[0] - m0
        total = total + _gauss_expect(P[0] + jnp.outer(r0, r0), P0)
        # transitions t = 2..T, summed:
        # E[(x_t - A x_{t-1} - c_t)(...)^T] = r r^T + P_t - X A^T - A X^T + A P_{t-1} A^T
        if T > 1:
            r = m[1:] - m[:-1] @ A.T - c[1:]
            Xs = jnp.sum(X, 0)
            S = r.T @ r + jnp.sum(P[1:], 0) - Xs @ A.T - A @ Xs.T + A @ jnp.sum(P[:-1], 0) @ A.T
            total = total + _gauss_expect(S, Q, T - 1)
        # emissions t = 1..T, summed:
        # E[(y_t - C x_t - e_t)(...)^T] = r r^T + Cyy - Cyx C^T - C Cyx^T + C P_t C^T
        r = Ey - m @ C.T - e
        Cs = jnp.sum(Cyx, 0)
        S = r.T @ r + jnp.sum(Cyy, 0) - Cs @ C.T - C @ Cs.T + C @ jnp.sum(P, 0) @ C.T
        total = total + _gauss_expect(S, R, T)
    return total


# --------------------------------------------------------------------------------------
# extended precision (long double) log-marginal for ill-conditioned stress cases
# --------------------------------------------------------------------------------------


def dense_log_marginal_longdouble(params, y):
    """``log p(y_o)`` of the dense joint Gaussian in ``np.longdouble`` arithmetic.

    Same construction as :func:`dense_log_marginal` (no inputs), with a hand-written
    Cholesky factorisation since LAPACK has no extended precision.
    """
    ld = np.longdouble
    y = np.asarray(y, float)
    T, dy = y.shape
    A = np.asarray(params["A"], ld)
    C = np.asarray(params["C"], ld)
    Q, R = as_cov(params["Q"]).astype(ld), as_cov(params["R"]).astype(ld)
    dx = A.shape[0]
    b = np.asarray(params.get("b", np.zeros(dx)), ld)
    d = np.asarray(params.get("d", np.zeros(dy)), ld)
    V = [as_cov(params["P0"]).astype(ld)]
    means = [np.asarray(params["m0"], ld)]
    for _ in range(1, T):
        V.append(A @ V[-1] @ A.T + Q)
        means.append(A @ means[-1] + b)
    n = T * dx
    Sxx = np.zeros((n, n), ld)
    for t in range(T):
        M = V[t]  # Cov[x_s, x_t] = A^{s-t} V_t for s >= t
        for s in range(t, T):
            Sxx[s * dx : (s + 1) * dx, t * dx : (t + 1) * dx] = M
            Sxx[t * dx : (t + 1) * dx, s * dx : (s + 1) * dx] = M.T
            M = A @ M
    Cb = np.kron(np.eye(T, dtype=ld), C)
    Syy = Cb @ Sxx @ Cb.T + np.kron(np.eye(T, dtype=ld), R)
    mu = Cb @ np.concatenate(means) + np.tile(d, T)
    yv = y.reshape(-1)
    o = ~np.isnan(yv)
    S = Syy[np.ix_(o, o)]
    k = S.shape[0]
    L = np.zeros_like(S)
    for j in range(k):
        L[j, j] = np.sqrt(S[j, j] - L[j, :j] @ L[j, :j])
        L[j + 1 :, j] = (S[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    r = yv[o].astype(ld) - mu[o]
    z = np.zeros(k, ld)
    for i in range(k):
        z[i] = (r[i] - L[i, :i] @ z[:i]) / L[i, i]
    two_pi = ld(2) * ld(np.pi)
    return float(-0.5 * (z @ z + 2 * np.sum(np.log(np.diag(L))) + k * np.log(two_pi)))
