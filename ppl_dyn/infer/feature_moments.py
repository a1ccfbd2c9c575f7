r"""Gaussian expectations of regression features under one Gaussian cloud.

For a cloud :math:`x \sim \mathcal N(m, P)` (``P`` may be singular) and the features
:math:`\phi` of a :class:`~ppl_dyn.state_space.Regression`, :func:`feature_moments` returns

* ``mean``   :math:`\mathbb E[\phi(x)]`, ``(p,)``;
* ``second`` :math:`\mathbb E[\phi(x)\phi(x)^\top]`, ``(p, p)``;
* ``jac``    :math:`\mathbb E[\partial\phi/\partial x]`, ``(p, dx)``, the expected Jacobian.

:func:`cross_moment` then gives :math:`\mathbb E[z\,\phi(x)^\top]` for any ``z`` jointly
Gaussian with ``x``, by Stein's lemma in x-marginal form (algorithms.md §5.4):

.. math::
    \mathbb E[z\,\phi(x)^\top] = m_z\,\mathbb E[\phi]^\top + C_{zx}\,\mathbb E[J_\phi]^\top,
    \qquad C_{zx} = \operatorname{Cov}[z, x].

No cloud covariance is ever inverted, so singular clouds (observed ``z``: ``C_zx = 0``,
zero-variance inputs; algorithms.md §5.3) are fine. With ``z = x`` (``m_z = m``,
``C_zx = P``) this is :math:`\mathbb E[x\phi^\top]`.

Features (one cloud; callers ``vmap`` over time):

* ``"linear"``, :math:`\phi = x`: mean ``m``, second ``P + m m^T``, jac ``I`` (§6.3).
* ``"tanh"``, elementwise: probabilists' Gauss–Hermite (§5.4). :math:`\mathbb E[\tanh]`,
  :math:`\mathbb E[1-\tanh^2]` (diagonal jac) and the diagonal of the second moment are 1-D
  integrals over the marginals :math:`\mathcal N(m_k, P_{kk})`; each off-diagonal entry is a
  tensor-product 2-D rule over the bivariate marginal, with the 2x2 Cholesky factor
  written in correlation form so that a singular marginal (zero variance, :math:`|r|=1`)
  is handled without NaN.
* ``"rbf"``, :math:`\phi = [\rho_1..\rho_I; x]` with
  :math:`\rho_i = \mathcal N(x; c_i, S_i)`, :math:`S_i = w_i^2 I` (§6.5, §6.8):

  .. math::
      \beta_i = \mathbb E[\rho_i] = \mathcal N(m; c_i, S_i + P),\qquad
      \mathbb E[\partial\rho_i/\partial x] = \beta_i (P + S_i)^{-1}(c_i - m),

  .. math::
      \mathbb E[\rho_i\rho_l] = \mathcal N(c_i; c_l, S_i + S_l)\,
      \mathcal N(m; c_{il}, S_{il} + P),\quad
      S_{il} = \tfrac{w_i^2 w_l^2}{w_i^2 + w_l^2} I,\quad
      c_{il} = \tfrac{w_l^2 c_i + w_i^2 c_l}{w_i^2 + w_l^2},

  all in logs via Cholesky factors of ``S + P`` (exponentiated last, so far clouds
  underflow harmlessly to 0). Stein's lemma then gives
  :math:`\mathbb E[x\rho_i] = \beta_i[m + P(P+S_i)^{-1}(c_i - m)]` and
  :math:`\mathbb E[z\rho_i] = \beta_i[m_z + C_{zx}(P+S_i)^{-1}(c_i - m)]`, the boxed
  formulas of §6.5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn.features import linear_features, rbf_features, tanh_features
from ppl_dyn.infer import _linalg as la
from ppl_dyn.state_space import Regression


class FeatureMoments(NamedTuple):
    mean: jax.Array  # E[phi(x)]              (p,)
    second: jax.Array  # E[phi(x) phi(x)^T]   (p, p)
    jac: jax.Array  # E[d phi / d x]          (p, dx)


def cross_moment(fm: FeatureMoments, m_z, C_zx) -> jax.Array:
    """``E[z phi(x)^T]`` ``(dz, p)`` for ``(x, z)`` jointly Gaussian with ``E[z] = m_z``
    ``(dz,)`` and ``Cov[z, x] = C_zx`` ``(dz, dx)`` (Stein's lemma, x-marginal form)."""
    return m_z[:, None] * fm.mean[None, :] + C_zx @ fm.jac.T


def feature_moments(reg: Regression, m, P, *, num_nodes: int = 32) -> FeatureMoments:
    """Moments of ``reg.features`` under ``x ~ N(m, P)``: ``m`` ``(dx,)``, ``P`` ``(dx, dx)``
    positive semi-definite. ``num_nodes``: Gauss–Hermite nodes per dimension ("tanh")."""
    dtype = jnp.result_type(m, P, float)
    m = jnp.asarray(m, dtype)
    P = jnp.asarray(P, dtype)
    fmap = reg.feature_map
    if fmap.moments is not None:  # the user's own, declared with the map
        mean, second, jac = fmap.moments(m, P, *fmap.args)
        return FeatureMoments(*(jnp.asarray(a, dtype) for a in (mean, second, jac)))
    # the built-in maps (by the function itself: a user's map named "tanh" is not ours)
    if fmap.fn is linear_features:
        return _from_mean_jac(m, m, P, jnp.eye(m.shape[-1], dtype=dtype), None)
    if fmap.fn is tanh_features:
        return _tanh_moments(m, P, num_nodes)
    if fmap.fn is rbf_features:
        centres, widths = fmap.args
        return _rbf_moments(m, P, jnp.asarray(centres, dtype), jnp.asarray(widths, dtype))
    raise ValueError(
        f"the feature map {fmap.name!r} of {reg.weight} has no Gaussian moments "
        "(Features(..., moments=None)): a Gaussian E-step (KalmanSmoother, "
        "ExtendedKalmanSmoother) cannot compute the closed-form M-step's statistics. Use "
        "a particle E-step (ParticleSmoother, PARISSmoother, CPFAS), which needs phi "
        "only, or give Features(..., moments=fn)"
    )


def _from_mean_jac(m, mean, P, jac, block):
    """Assemble moments of ``phi = [g(x); x]`` (``g`` possibly empty): the rows of
    ``second`` that involve ``x`` come from Stein's lemma; ``block`` is ``E[g g^T]``."""
    fm = FeatureMoments(mean, None, jac)
    x_phi = cross_moment(fm, m, P)  # E[x phi^T]  (dx, p)
    if block is None:
        return FeatureMoments(mean, la.sym(x_phi), jac)
    k = block.shape[0]
    top = jnp.concatenate([block, x_phi[:, :k].T], axis=1)
    return FeatureMoments(mean, jnp.concatenate([top, x_phi], axis=0), jac)


# --------------------------------------------------------------------------------------
# RBF: closed form (algorithms.md §6.5)
# --------------------------------------------------------------------------------------


def _log_normal_pdf(x, mean, cov):
    """log N(x; mean, cov) over the last axis, batched over leading axes of ``cov``."""
    L = la.cholesky(cov)
    r = la.solve_lower(L, x - mean)
    d = x.shape[-1]
    return (
        -0.5 * jnp.sum(r**2, -1)
        - 0.5 * la.log_det_from_cholesky(L)
        - 0.5 * d * math.log(2 * math.pi)
    )


def _rbf_moments(m, P, centres, widths):
    dx = m.shape[-1]
    eye = jnp.eye(dx, dtype=m.dtype)
    s2 = widths**2  # (I,)
    cov = P + s2[:, None, None] * eye  # (I, dx, dx) = P + S_i
    L = la.cholesky(cov)
    alpha = la.cho_solve(L, centres - m)  # (I, dx) = (P + S_i)^{-1} (c_i - m)
    r = la.solve_lower(L, m - centres)
    log_beta = (
        -0.5 * jnp.sum(r**2, -1)
        - 0.5 * la.log_det_from_cholesky(L)
        - 0.5 * dx * math.log(2 * math.pi)
    )
    beta = jnp.exp(log_beta)

    # pairs (i, l): written symmetrically so that the block is exactly symmetric
    ssum = s2[:, None] + s2[None, :]  # (I, I)
    d2 = jnp.sum((centres[:, None, :] - centres[None, :, :]) ** 2, -1)
    log_pair = -0.5 * d2 / ssum - 0.5 * dx * jnp.log(2 * math.pi * ssum)
    s_il = s2[:, None] * s2[None, :] / ssum
    c_il = (s2[None, :, None] * centres[:, None, :] + s2[:, None, None] * centres[None, :, :]) / (
        ssum[..., None]
    )
    log_rr = log_pair + _log_normal_pdf(m, c_il, P + s_il[..., None, None] * eye)
    rho_rho = jnp.exp(log_rr)

    mean = jnp.concatenate([beta, m])
    jac = jnp.concatenate([beta[:, None] * alpha, eye], axis=0)
    return _from_mean_jac(m, mean, P, jac, rho_rho)


# --------------------------------------------------------------------------------------
# tanh: Gauss–Hermite (algorithms.md §5.4)
# --------------------------------------------------------------------------------------


def _safe_sqrt(v):
    """sqrt clipped at 0, with finite gradients at 0."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _tanh_moments(m, P, num_nodes):
    dx = m.shape[-1]
    xi, w = np.polynomial.hermite_e.hermegauss(num_nodes)  # trace-time constants
    xi = jnp.asarray(xi, m.dtype)
    w = jnp.asarray(w / w.sum(), m.dtype)

    # 1-D: x_k = m_k + s_k xi
    var = jnp.diagonal(P)
    s = _safe_sqrt(var)  # (dx,)
    t = jnp.tanh(m[:, None] + s[:, None] * xi)  # (dx, n)
    mean = t @ w
    diag2 = (t**2) @ w
    jac = jnp.diag((1.0 - t**2) @ w)

    # 2-D over each bivariate marginal (k < l, i.e. ia < ib):
    #   x_k = m_k + s_k xi_a,  x_l = m_l + s_l (r xi_a + sqrt(1 - r^2) xi_b)
    second = jnp.diag(diag2)
    if dx > 1:
        ia, ib = np.triu_indices(dx, 1)
        sk, sl = s[ia], s[ib]
        denom = sk * sl
        ok = denom > 0
        r = jnp.clip(jnp.where(ok, P[ia, ib] / jnp.where(ok, denom, 1.0), 0.0), -1.0, 1.0)
        q = _safe_sqrt(1.0 - r**2)
        tk = t[ia]  # (npairs, n) at xi_a
        xl = m[ib][:, None, None] + sl[:, None, None] * (
            r[:, None, None] * xi[:, None] + q[:, None, None] * xi[None, :]
        )  # (npairs, a, b)
        inner = jnp.tanh(xl) @ w  # (npairs, a)
        off = jnp.sum(tk * inner * w, -1)
        second = second.at[ia, ib].set(off).at[ib, ia].set(off)
    return FeatureMoments(mean, second, jac)
