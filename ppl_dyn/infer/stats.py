"""Expected sufficient statistics for the linear-in-parameters M-step.

Every regression ``z = W phi + V u + c + noise`` is summarised by
``S_zr = sum E[z r^T]``, ``S_rr = sum E[r r^T]``, ``S_zz = sum E[z z^T]`` and a count
``n``, with the full regressor ``r = [phi(x); u; 1]`` (see ``docs/math.md`` section 1).
Statistics are additive over time steps and sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ppl_dyn.infer import _linalg as la
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
    k = block.shape[-1]
    out = jnp.zeros(block.shape[:-2] + (p, p), block.dtype)
    return out.at[..., :k, :k].set(block)


def imputed_observations(H, e, R, y, means, covs):
    """Moments of ``y_t`` (missing entries imputed) under the smoothed posterior.

    Returns ``E[y_t]`` ``(T, dy)``, ``Cov[y_t, x_t]`` ``(T, dy, dx)`` and
    ``Cov[y_t]`` ``(T, dy, dy)``. For observed entries these are ``y`` and zeros.
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


def gaussian_linear_statistics(post, ss: StateSpace, y, u) -> LinearStats:
    """Exact statistics for linear features under a Gaussian posterior (batched ``S``)."""
    from ppl_dyn.infer.kalman import linear_gaussian_view

    st = ss.structure
    if st is None:
        raise ValueError(
            "the model declares no LinearStructure; closed-form M-steps need one "
            "(use a GradientMStep for models without a closed form)"
        )
    for reg, what in ((st.dynamics, "dynamics"), (st.emission, "emission")):
        if reg.feature != "linear":
            raise NotImplementedError(
                f"{what} features {reg.feature!r} need expectations of nonlinear features; "
                "the Kalman/Gaussian statistics here support linear features only"
            )

    def one(means, covs, cross, y_s, u_s):
        view = linear_gaussian_view(ss, u_s)
        dx = means.shape[-1]
        # dynamics: z = x_t, r = [x_{t-1}; u_t; 1], t = 2..T
        r_bar = _regressor_means(means[:-1], u_s[1:])
        p = r_bar.shape[-1]
        S_rr = r_bar.T @ r_bar + _pad_top_left(jnp.sum(covs[:-1], 0), p)
        cross_sum = jnp.sum(cross, 0)  # sum Cov[x_t, x_{t-1}]
        S_zr = means[1:].T @ r_bar
        S_zr = S_zr.at[:, :dx].add(cross_sum)
        S_zz = means[1:].T @ means[1:] + jnp.sum(covs[1:], 0)
        n_dyn = jnp.asarray(means.shape[0] - 1, means.dtype)
        dyn = RegressionStats(S_zr, S_rr, S_zz, n_dyn)
        # emission: z = y_t (missing entries imputed), r = [x_t; u_t; 1], t = 1..T
        Ey, Cyx, Cyy = imputed_observations(view.H, view.e, view.R, y_s, means, covs)
        psi = _regressor_means(means, u_s)
        q = psi.shape[-1]
        E_rr = psi.T @ psi + _pad_top_left(jnp.sum(covs, 0), q)
        E_zr = (Ey.T @ psi).at[:, :dx].add(jnp.sum(Cyx, 0))
        E_zz = Ey.T @ Ey + jnp.sum(Cyy, 0)
        emi = RegressionStats(E_zr, E_rr, E_zz, jnp.asarray(means.shape[0], means.dtype))
        init = InitStats(
            means[0], covs[0] + jnp.outer(means[0], means[0]), jnp.ones((), means.dtype)
        )
        return LinearStats(dyn, emi, init)

    per_seq = jax.vmap(one)(post.means, post.covs, post.cross_covs, y, u)
    return sum_stats(per_seq)
