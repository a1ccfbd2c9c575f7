"""Expected sufficient statistics for the linear-in-parameters M-step.

Every regression ``z = W phi + V u + c + noise`` is summarised by
``S_zr = sum E[z r^T]``, ``S_rr = sum E[r r^T]``, ``S_zz = sum E[z z^T]`` and a count
``n``, with the full regressor ``r = [phi(x); u; 1]`` (see ``docs/math.md`` section 1).
Statistics are additive over time steps and sequences.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._pattern import COMPLETE, RAGGED
from ppl_dyn.state_space import StateSpace, mask_covariance


class RegressionStats(NamedTuple):
    S_zr: jax.Array  # (dz, p)
    S_rr: jax.Array  # (p, p)
    S_zz: jax.Array  # (dz, dz)
    n: jax.Array  # ()


class InitStats(NamedTuple):
    sum_m: jax.Array  # sum_s E[x_1]
    sum_mm: jax.Array  # sum_s E[x_1 x_1^T]
    n: jax.Array  # number of sequences


class LinearStats(NamedTuple):
    dynamics: RegressionStats
    emission: RegressionStats
    init: InitStats


def sum_stats(stats, axis=0):
    return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis), stats)


def _regressor_means(feat_means, u):
    ones = jnp.ones(u.shape[:-1] + (1,), u.dtype)
    return jnp.concatenate([feat_means, u, ones], -1)


def _pad_top_left(block, p):
    """``block`` ``(..., k, k)`` in the top-left corner of a ``(..., p, p)`` zero matrix."""
    k = block.shape[-1]
    return jnp.pad(block, [(0, 0)] * (block.ndim - 2) + [(0, p - k), (0, p - k)])


def _add_left(M, block):
    """``M`` with ``block`` added to its first columns (a pad, not a scatter)."""
    return M + jnp.pad(block, [(0, 0), (0, M.shape[-1] - block.shape[-1])])


def imputed_observations(H, e, R, y, means, covs):
    """Moments of ``y_t`` (missing entries imputed) under the smoothed posterior.

    The emission is ``y_t = H f_t + e_t + v_t`` with features ``f_t`` of the state whose
    posterior mean and covariance are ``means`` ``(T, k)`` and ``covs`` ``(T, k, k)``
    (for linear features ``f_t = x_t``). Returns ``E[y_t]`` ``(T, dy)``,
    ``Cov[y_t, f_t]`` ``(T, dy, k)`` and ``Cov[y_t]`` ``(T, dy, dy)``; for observed
    entries these are ``y`` and zeros.
    """
    mask = ~jnp.isnan(y)
    yf = jnp.where(mask, y, 0.0)

    def one(mask_t, y_t, e_t, m_t, P_t):
        o = mask_t.astype(R.dtype)
        miss = 1.0 - o
        Rt = mask_covariance(R, mask_t)
        # K_full[:, obs] = R[:, obs] R_oo^{-1}, zero columns for missing entries
        K = la.cho_solve(la.cholesky(Rt), (R * o[None, :]).T).T * o[None, :]
        M = miss[:, None] * (H - K @ H)
        k = o * y_t + miss * (e_t + K @ (o * (y_t - e_t)))
        Rc = miss[:, None] * (R - K @ R) * miss[None, :]
        Ey = M @ m_t + k
        Cyx = M @ P_t
        Cyy = M @ P_t @ M.T + 0.5 * (Rc + Rc.T)
        return Ey, Cyx, Cyy

    return jax.vmap(one)(mask, yf, e, means, covs)


def feature_statistics(reg, means, covs):
    """Posterior mean ``(T, k)``, covariance ``(T, k, k)`` and expected Jacobian
    ``(T, k, dx)`` of the regression features ``phi(x_t)`` under ``N(means, covs)``.

    Linear features are exact; tanh (Gauss-Hermite) and RBF (closed form) come from
    :func:`ppl_dyn.infer.feature_moments.feature_moments`.
    """
    if reg.feature_map.is_identity:
        eye = jnp.eye(means.shape[-1], dtype=means.dtype)
        return means, covs, jnp.broadcast_to(eye, covs.shape)
    from ppl_dyn.infer.feature_moments import feature_moments

    # chunks of time steps: a vmap over all T would materialise (T, I, I, dx, dx) pair
    # buffers for RBF features (GBs at T = 10^4, I = 50)
    fm = jax.lax.map(lambda mP: feature_moments(reg, *mP), (means, covs), batch_size=128)
    cov = fm.second - fm.mean[..., :, None] * fm.mean[..., None, :]
    return fm.mean, 0.5 * (cov + jnp.swapaxes(cov, -1, -2)), fm.jac


def _emission_design(ss: StateSpace, u):
    """``(W, e)`` with ``E[y_t | x_t] = W phi(x_t) + e_t`` for the emission regression."""
    reg = ss.structure.emission
    W = jnp.asarray(ss.params[reg.weight])
    x0 = jnp.zeros((ss.state_dim,), u.dtype)
    e = jax.vmap(lambda ut: ss.emission_mean(x0, ut) - W @ reg.features(x0))(u)
    return W.astype(u.dtype), e


def keep(valid, a):
    """``a`` ``(T, ...)`` with the rows where ``valid`` ``(T,)`` is False set to 0 (a
    select, not a product: padded steps may hold inf or NaN). ``valid`` None: every row
    kept (no select traced)."""
    if valid is None:
        return a
    return jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))


def gaussian_linear_statistics(
    post, ss: StateSpace, y, u, time_mask=None, data_pattern=None
) -> LinearStats:
    """Statistics for the regression M-step under a Gaussian posterior (batched ``S``).

    Dynamics: ``z = x_t``, ``r = [phi(x_{t-1}); u_t; 1]``; emission: ``z = y_t``
    (missing entries imputed), ``r = [psi(x_t); u_t; 1]``. Feature expectations use the
    x-marginal (Stein) form ``E[z phi^T] = E[z] E[phi]^T + Cov[z, x] E[d phi/dx]^T``,
    which never inverts a cloud covariance (``docs/math.md`` section 5).

    ``time_mask`` ``(S, T)`` (ragged lengths): steps where it is False lie past the
    sequence's end and contribute nothing: no emission term, no transition into them,
    and a sequence of length 0 (internal padding) not even an initial-state term. The
    pooled statistics then equal the sum over the sequences cut at their lengths.

    ``data_pattern`` (``ppl_dyn.infer._pattern``): the missing-data pattern when it is
    known as the program is traced (the driver knows it); only the path for it (with or
    without imputation terms) is traced. None: both, chosen at run time.
    """
    st = ss.structure
    if st is None:
        raise ValueError(
            "the model declares no LinearStructure; closed-form M-steps need one "
            "(use a GradientMStep for models without a closed form)"
        )

    def one(means, covs, cross, y_s, u_s, valid, impute):
        # valid None: no time mask, every step inside the sequence (nothing to select
        # or weight: less to trace, compile and run)
        T = means.shape[0]
        if valid is None:
            w = wd = v_next = None  # weights 1, nothing to select
        else:
            w = valid.astype(means.dtype)  # 1 inside the sequence, 0 past its end
            wd, v_next = w[1:], valid[1:]  # transitions into t = 2..T
        weigh = lambda a, wt: a if wt is None else a * wt[:, None]  # noqa: E731
        count = lambda wt, n: jnp.asarray(n, means.dtype) if wt is None else jnp.sum(wt)  # noqa: E731
        means, covs = keep(valid, means), keep(valid, covs)
        cross = keep(v_next, cross)
        # dynamics: z = x_t, r = [phi(x_{t-1}); u_t; 1], t = 2..T
        f_mean, f_cov, f_jac = feature_statistics(st.dynamics, means[:-1], covs[:-1])
        r_bar = weigh(_regressor_means(f_mean, u_s[1:]), wd)
        p = r_bar.shape[-1]
        S_rr = r_bar.T @ r_bar + _pad_top_left(jnp.sum(keep(v_next, f_cov), 0), p)
        if st.dynamics.feature_map.is_identity:
            cz = jnp.sum(cross, 0)  # sum Cov[x_t, x_{t-1}]
        else:
            cz = jnp.einsum("tij,tkj->ik", cross, f_jac)  # sum Cov[x_t, x_{t-1}] E[J]^T
        S_zr = _add_left(means[1:].T @ r_bar, cz)
        S_zz = means[1:].T @ weigh(means[1:], wd) + jnp.sum(keep(v_next, covs[1:]), 0)
        dyn = RegressionStats(S_zr, S_rr, S_zz, count(wd, T - 1))
        # emission: z = y_t (missing entries imputed), r = [psi(x_t); u_t; 1], t = 1..T
        g_mean, g_cov, _ = feature_statistics(st.emission, means, covs)
        psi = weigh(_regressor_means(g_mean, u_s), w)
        q = psi.shape[-1]
        E_rr = psi.T @ psi + _pad_top_left(jnp.sum(keep(valid, g_cov), 0), q)
        if impute:
            linear = st.emission.feature_map.is_identity
            H, e = _linear_emission(ss, u_s) if linear else _emission_design(ss, u_s)
            R = ss.emission_cov(u_s[0])
            Ey, Cyf, Cyy = imputed_observations(H, e, R, y_s, g_mean, g_cov)
            Ey, Cyf, Cyy = keep(valid, Ey), keep(valid, Cyf), keep(valid, Cyy)
            E_zr = _add_left(Ey.T @ psi, jnp.sum(Cyf, 0))
            E_zz = Ey.T @ Ey + jnp.sum(Cyy, 0)
        else:  # fully observed (within the sequences): no imputation terms
            y0 = keep(valid, y_s)
            E_zr = y0.T @ psi
            E_zz = y0.T @ y0
        emi = RegressionStats(E_zr, E_rr, E_zz, count(w, T))
        w0 = jnp.ones((), means.dtype) if w is None else w[0]
        init = InitStats(means[0], covs[0] + jnp.outer(means[0], means[0]), w0)
        return LinearStats(dyn, emi, init)

    def run(impute):
        if time_mask is None and y.shape[0] == 1:  # one sequence: no batching to trace
            return one(post.means[0], post.covs[0], post.cross_covs[0], y[0], u[0], None, impute)
        # (a None time mask has no leaves: vmap passes it through as None)
        per_seq = jax.vmap(lambda *a: one(*a, impute))(
            post.means, post.covs, post.cross_covs, y, u, time_mask
        )
        return sum_stats(per_seq)

    # imputation costs a dy x dy factorisation per step: skip it when nothing is missing
    if data_pattern is not None:  # known at trace time (EM): compile one path only
        return run(data_pattern not in (COMPLETE, RAGGED))
    mask = jnp.ones(y.shape[:2], bool) if time_mask is None else time_mask
    missing = jnp.any(jnp.isnan(y) & mask[..., None])
    return jax.lax.cond(missing, lambda: run(True), lambda: run(False))


def _linear_emission(ss: StateSpace, u):
    """``(H, e)`` with ``E[y_t | x_t] = H x_t + e_t``: a linear-feature emission
    regression (its matrix does not change with the inputs), read off the mean."""
    x0 = jnp.zeros((ss.state_dim,), u.dtype)
    H = jax.jacfwd(lambda x: ss.emission_mean(x, u[0]))(x0)
    e = jax.vmap(lambda ut: ss.emission_mean(x0, ut))(u)
    return H.astype(u.dtype), e.astype(u.dtype)


def sample_smoothed_paths(rng_key, posterior, num_paths: Optional[int] = None) -> jax.Array:
    """Joint draws of ``x_{1:T}`` from a Gaussian smoothed posterior.

    The smoothed posterior of a linear-Gaussian model is a Gauss-Markov chain:
    ``x_1 ~ N(m_1, P_1)`` and ``x_{t+1} | x_t ~ N(m_{t+1} + G_t (x_t - m_t),
    P_{t+1} - G_t X_t^T)`` with ``X_t = Cov[x_{t+1}, x_t | y]`` and ``G_t = X_t P_t^{-1}``.
    ``posterior.means`` may carry any leading batch axes ``(..., T, dx)``; with
    ``num_paths`` a new leading axis of that many paths is added.
    """
    m, P, X = posterior.means, posterior.covs, posterior.cross_covs
    if num_paths is not None:
        m, P, X = (jnp.broadcast_to(a, (num_paths,) + a.shape) for a in (m, P, X))
    lead, (T, dx) = m.shape[:-2], m.shape[-2:]
    m = jnp.reshape(m, (-1, T, dx))
    P = jnp.reshape(P, (-1, T, dx, dx))
    z = jax.random.normal(rng_key, m.shape, m.dtype)
    jitter = 1e-12 * jnp.eye(dx, dtype=m.dtype)
    x1 = m[:, 0] + la.mv(la.cholesky(la.sym(P[:, 0]) + jitter), z[:, 0])
    if T == 1:
        return jnp.reshape(x1, lead + (1, dx))
    X = jnp.reshape(X, (-1, T - 1, dx, dx))
    # conditional moments for all t at once, then one scan for the mean recursion
    Lp = la.cholesky(la.sym(P[:, :-1]) + jitter)
    G = jnp.swapaxes(la.cho_solve(Lp, jnp.swapaxes(X, -1, -2)), -1, -2)  # X P^{-1}
    cond = la.sym(P[:, 1:] - la.mm(G, jnp.swapaxes(X, -1, -2))) + jitter
    noise = la.mv(la.cholesky(cond), z[:, 1:])  # (B, T-1, dx)

    def step(x_prev, inp):
        m_prev, m_next, G_t, e_t = inp
        x = m_next + la.mv(G_t, x_prev - m_prev) + e_t
        return x, x

    tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  (B, T-1, ...) -> (T-1, B, ...)
    _, xs = jax.lax.scan(step, x1, (tm(m[:, :-1]), tm(m[:, 1:]), tm(G), tm(noise)))
    out = jnp.concatenate([x1[:, None], tm(xs)], 1)
    return jnp.reshape(out, lead + (T, dx))
