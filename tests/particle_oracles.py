"""Independent numpy oracles for the particle-smoother tests.

Nothing here calls ppl_dyn's particle code. The two-slice smoothing weights are built
densely from the formulas of seed 000 (eq 20, index typos corrected, docs/math.md):

    v_T^i = w_T^i,
    W_t^{ij} = w_t^i v_{t+1}^j p(x_{t+1}^j | x_t^i) / sum_k w_t^k p(x_{t+1}^j | x_t^k),
    v_t^i = sum_j W_t^{ij},

with ``w`` the (normalised) filter weights. All log-densities are evaluated with scipy.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

LOG2PI = np.log(2.0 * np.pi)


def as_cov(v):
    v = np.asarray(v, float)
    return np.diag(v) if v.ndim == 1 else v


def gauss_logpdf_rows(z, means, cov):
    """``log N(z^j; means^i, cov)`` as a matrix ``(len(z), len(means))`` (scipy)."""
    z = np.asarray(z, float)
    means = np.asarray(means, float)
    diff = z[:, None, :] - means[None, :, :]  # (J, I, d)
    d = z.shape[-1]
    mvn = multivariate_normal(mean=np.zeros(d), cov=as_cov(cov))
    return mvn.logpdf(diff.reshape(-1, d)).reshape(diff.shape[:2])


def transition_log_matrix(params, x_next, x_prev, feature=lambda x: x):
    """``lam[j, i] = log N(x_next^j; A phi(x_prev^i) + b, Q)`` (no inputs)."""
    A = np.asarray(params["A"], float)
    b = np.asarray(params.get("b", np.zeros(A.shape[0])), float)
    mu = feature(np.asarray(x_prev, float)) @ A.T + b
    return gauss_logpdf_rows(x_next, mu, params["Q"])


def dense_ffbsm(particles, log_weights, params, feature=lambda x: x):
    """Dense FFBSm: returns ``log_v (T, N)``, ``W (T-1, N, N)`` (rows i = x_t, cols
    j = x_{t+1}) and ``pair (T-1, dx, k) = sum_ij W^{ij} x_{t+1}^j phi(x_t^i)^T``."""
    X = np.asarray(particles, float)
    LW = np.asarray(log_weights, float)
    T, N, _ = X.shape
    log_v = np.empty((T, N))
    log_v[-1] = LW[-1]
    Ws, pairs = [], []
    for t in range(T - 2, -1, -1):
        lam = transition_log_matrix(params, X[t + 1], X[t], feature)  # (j, i)
        a = LW[t][None, :] + lam  # (j, i)
        den = logsumexp(a, axis=1)  # (j,)
        logW = a + (log_v[t + 1] - den)[:, None]  # (j, i)
        W = np.exp(logW).T  # (i, j)
        Ws.append(W)
        log_v[t] = logsumexp(logW, axis=0)
        pairs.append(X[t + 1].T @ W.T @ feature(X[t]))
    return log_v, np.array(Ws[::-1]), np.array(pairs[::-1])


def literal_eq23_weights(particles, log_weights, log_v, params, feature=lambda x: x):
    """The seed's eq 23 *as printed* (the negative control): in pair notation
    ``(t-1, t)`` its denominator is ``sum_k w_t^k p(x_t^i | x_{t-1}^k)`` (filter weights
    at ``t`` instead of ``t-1``, state ``x_t^i`` instead of ``x_t^j``):

        W_lit^{ij} = w_{t-1}^i v_t^j p(x_t^j | x_{t-1}^i) / sum_k w_t^k p(x_t^i | x_{t-1}^k).

    Returned with rows ``i`` (earlier slice) and columns ``j`` (later slice), ``(T-1, N, N)``.
    """
    X = np.asarray(particles, float)
    LW = np.asarray(log_weights, float)
    log_v = np.asarray(log_v, float)
    T = X.shape[0]
    out = []
    for t in range(1, T):
        lam = transition_log_matrix(params, X[t], X[t - 1], feature)  # [j, i]
        num = LW[t - 1][:, None] + log_v[t][None, :] + lam.T  # [i, j]
        den = logsumexp(LW[t][None, :] + lam, axis=1)  # indexed by the row state i of x_t
        out.append(np.exp(num - den[:, None]))
    return np.array(out)


def genealogy_indices(ancestors):
    """For each final particle, the index of its ancestor at every time ``(T, N)``."""
    anc = np.asarray(ancestors)
    T, N = anc.shape
    idx = np.empty((T, N), dtype=int)
    idx[-1] = np.arange(N)
    for t in range(T - 1, 0, -1):
        idx[t - 1] = anc[t][idx[t]]
    return idx


def weighted_regression(S_zr, S_rr):
    """``W = S_zr S_rr^{-1}`` (the closed-form regression coefficient)."""
    return np.linalg.solve(S_rr.T, S_zr.T).T
