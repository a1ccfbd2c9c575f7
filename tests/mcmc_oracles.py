"""Independent oracles for the MCMC tests: the built-in LDS's log joint density on
NumPyro's unconstrained scale, written with numpy / scipy only.

The potential energy NUTS uses is

    U(z) = -[log p(y, x | theta(z)) + log p(theta(z)) + sum_sites log |det d theta / d z|]

Here the likelihood comes from the dense joint Gaussian (``oracles.py``), the priors from
``scipy.stats`` and the log-Jacobians from *central finite differences* of the
constraining map (no analytic Jacobian is shared with numpyro). The only convention
shared with numpyro is the layout of the unconstrained vector of a covariance site:
the strictly lower triangle of its Cholesky factor in row-major order, then the log of
the diagonal (``LowerCholeskyTransform``).
"""

from __future__ import annotations

import numpy as np
import oracles as O
from scipy import stats

# site -> (prior family, arguments) of models.lds with full covariances
COV_SITES = ("Q", "R", "P0")


def pd_from_unconstrained(v, n):
    """Covariance ``L L^T`` from the unconstrained vector of a positive-definite site."""
    v = np.asarray(v, float)
    L = np.zeros((n, n))
    L[np.tril_indices(n, -1)] = v[: n * (n - 1) // 2]
    L[np.diag_indices(n)] = np.exp(v[n * (n - 1) // 2 :])
    return L @ L.T


def log_abs_det_jacobian_fd(fn, v, h=1e-5):
    """``log |det J|`` of ``fn: R^k -> R^k`` at ``v`` by central differences."""
    v = np.asarray(v, float)
    k = v.size
    J = np.zeros((k, k))
    for i in range(k):
        e = np.zeros(k)
        e[i] = h
        J[:, i] = (fn(v + e) - fn(v - e)) / (2 * h)
    return float(np.linalg.slogdet(J)[1])


def _vech(S):
    return S[np.tril_indices(S.shape[0])]


def constrain(z, dx, dy):
    """Parameters of ``models.lds`` (full covariances, bias) from unconstrained ``z``,
    and the total log-Jacobian of the covariance sites."""
    z = {k: np.asarray(v, float) for k, v in z.items()}
    params = {k: z[k] for k in ("A", "C", "b", "d", "m0")}
    log_jac = 0.0
    for name, n in (("Q", dx), ("R", dy), ("P0", dx)):
        params[name] = pd_from_unconstrained(z[name], n)
        vech_cov = lambda v, n=n: _vech(pd_from_unconstrained(v, n))  # noqa: E731
        log_jac += log_abs_det_jacobian_fd(vech_cov, z[name])
    return params, log_jac


def lds_log_prior(params, dx, dy):
    """Log prior density of ``models.lds`` (docs/models.md), by scipy."""
    lp = stats.norm(0.0, 0.5 / np.sqrt(dx)).logpdf(params["A"]).sum()
    for k in ("C", "b", "d", "m0"):
        lp += stats.norm(0.0, 1.0).logpdf(params[k]).sum()
    for name, n, scale in (("Q", dx, 0.1), ("R", dy, 0.1), ("P0", dx, 1.0)):
        S = params[name]
        if n == 1:  # scipy's invwishart wants a scalar in one dimension
            lp += stats.invwishart(df=n + 2.0, scale=scale).logpdf(S[0, 0])
        else:
            lp += stats.invwishart(df=n + 2.0, scale=scale * np.eye(n)).logpdf(S)
    return float(lp)


def marginal_potential(z, y, dx, dy):
    """``U(z)`` of ``marginalize(lds)``: states integrated out (dense Gaussian)."""
    params, log_jac = constrain(z, dx, dy)
    ll = O.dense_log_marginal(params, y)
    return -(ll + lds_log_prior(params, dx, dy) + log_jac)


def latent_potential(z, y, dx, dy):
    """``U(z)`` of ``lds`` with the states sampled (centred: sites ``x_1``, ``x``)."""
    params, log_jac = constrain(z, dx, dy)
    T = y.shape[0]
    x = np.concatenate([np.asarray(z["x_1"]).reshape(1, dx), np.asarray(z["x"]).reshape(T - 1, dx)])
    mu, Sigma, _, _ = O.dense_joint(params, T)
    joint = stats.multivariate_normal(mu, Sigma).logpdf(np.concatenate([x.ravel(), y.ravel()]))
    return -(joint + lds_log_prior(params, dx, dy) + log_jac)


def noncentered_states(params, eps):
    """States from innovations by the recursion ``x_t = A x_{t-1} + b + chol(Q) eps_t``."""
    L0 = np.linalg.cholesky(params["P0"])
    LQ = np.linalg.cholesky(params["Q"])
    x = np.zeros_like(eps)
    x[0] = params["m0"] + L0 @ eps[0]
    for t in range(1, eps.shape[0]):
        x[t] = params["A"] @ x[t - 1] + params["b"] + LQ @ eps[t]
    return x


def noncentered_potential(z, y, dx, dy):
    """``U(z)`` of ``noncentered(lds)``: innovations ``x_innovations`` ``(T, dx)``."""
    params, log_jac = constrain(z, dx, dy)
    eps = np.asarray(z["x_innovations"], float)
    x = noncentered_states(params, eps)
    emit = stats.multivariate_normal(np.zeros(dy), params["R"])
    ll = sum(emit.logpdf(y[t] - params["C"] @ x[t] - params["d"]) for t in range(y.shape[0]))
    prior_eps = stats.norm().logpdf(eps).sum()
    return -(ll + prior_eps + lds_log_prior(params, dx, dy) + log_jac)
