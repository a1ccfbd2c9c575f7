"""Nested initialisation (Ghahramani & Roweis): factor analysis -> LDS by EM -> RBF by EM.

The latent state of a nonlinear model is identified only up to an invertible map, and
EM from a prior draw can settle in a poor optimum. Ghahramani & Roweis therefore fit a
linear model first (itself started from factor analysis), place the RBF centres over the
states it infers, and start the RBF model from the LDS (RBF weights zero), so the first
RBF iteration sees the LDS's posterior.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn.infer._run import site_shapes, validate_data
from ppl_dyn.infer.eks import ExtendedKalmanSmoother
from ppl_dyn.infer.em import EM, EMResult
from ppl_dyn.infer.kalman import KalmanSmoother
from ppl_dyn.infer.mstep import LinearGaussianMStep


def _as_sequences(a, name):
    arr = np.asarray(a, dtype=float)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (T, dim) or (S, T, dim); got {arr.shape}")
    return arr


def _lstsq(X, Z):
    """Least-squares ``W`` with ``Z ~ X W^T`` and the residual covariance."""
    W = np.linalg.lstsq(X, Z, rcond=None)[0].T
    res = Z - X @ W.T
    return W, res.T @ res / max(len(Z) - X.shape[1], 1)


def factor_analysis_init(y, u=None, *, state_dim: int) -> dict:
    """LDS starting values from a principal-factor analysis of ``y``.

    The inputs' direct effect ``D u + d`` is regressed out of ``y``; the leading
    ``state_dim`` principal directions of the residual give ``C`` (scaled by the
    variance they explain above the noise level) and the rest the noise ``R``; states
    projected by the pseudo-inverse of ``C`` give ``A, B, b, Q`` by least squares and
    ``m0, P0`` from their first values. Missing entries (NaN) are filled with the
    column means. Returns full matrices for ``Q, R, P0``; :meth:`EM.run` accepts this
    dict as ``init`` for :func:`~ppl_dyn.models.lds` (diagonal noise sites take the
    diagonals).
    """
    Y = _as_sequences(y, "y")
    S, T, dy = Y.shape
    dx = int(state_dim)
    if dx < 1:
        raise ValueError(f"state_dim must be a positive int; got {state_dim!r}")
    if T < dx + 3:
        raise ValueError(f"factor analysis needs more than {dx + 2} time steps; got {T}")
    col_mean = np.nanmean(Y.reshape(-1, dy), 0)
    Y = np.where(np.isnan(Y), col_mean, Y)
    U = np.zeros((S, T, 0)) if u is None else _as_sequences(u, "u")
    if U.shape[0] == 1 and S > 1:
        U = np.broadcast_to(U, (S, T, U.shape[-1]))
    du = U.shape[-1]
    ones = np.ones((S, T, 1))
    X_in = np.concatenate([U, ones], -1).reshape(-1, du + 1)
    W_in, _ = _lstsq(X_in, Y.reshape(-1, dy))
    D, d = W_in[:, :du], W_in[:, du]
    resid = Y - np.einsum("stk,jk->stj", np.concatenate([U, ones], -1), W_in)
    cov = np.cov(resid.reshape(-1, dy), rowvar=False).reshape(dy, dy)
    lam, V = np.linalg.eigh(cov)
    lam, V = lam[::-1], V[:, ::-1]
    k = min(dx, dy)
    noise = float(np.mean(lam[k:])) if dy > k else 0.5 * float(np.mean(lam))
    noise = max(noise, 1e-3 * float(np.max(lam)) + 1e-12)
    C = np.zeros((dy, dx))
    C[:, :k] = V[:, :k] * np.sqrt(np.maximum(lam[:k] - noise, 0.1 * lam[:k]))
    if dx > k:  # more states than outputs: small extra directions, broken symmetry
        C[:, k:] = 0.1 * np.sqrt(noise) * np.eye(dy, dx - k)
    R = noise * np.eye(dy)
    Xs = np.einsum("ij,stj->sti", np.linalg.pinv(C), resid)  # (S, T, dx)
    reg_in = np.concatenate([Xs[:, :-1], U[:, 1:], ones[:, 1:]], -1).reshape(-1, dx + du + 1)
    W_dyn, Q = _lstsq(reg_in, Xs[:, 1:].reshape(-1, dx))
    Q = 0.5 * (Q + Q.T) + 1e-6 * np.trace(Q) / dx * np.eye(dx) + 1e-9 * np.eye(dx)
    x1 = Xs[:, 0]
    P0 = np.cov(Xs.reshape(-1, dx), rowvar=False).reshape(dx, dx) + 1e-6 * np.eye(dx)
    params = {
        "A": W_dyn[:, :dx],
        "b": W_dyn[:, -1],
        "C": C,
        "d": d,
        "Q": Q,
        "R": R,
        "m0": x1.mean(0),
        "P0": P0,
    }
    if du:
        params["B"] = W_dyn[:, dx : dx + du]
        params["D"] = D
    return params


def _fit_diagonals(model, params: dict, kwargs) -> dict:
    """Diagonal noise sites take the diagonals of full initial matrices."""
    shapes, _ = site_shapes(model, kwargs)
    out = {}
    for k, v in params.items():
        if k in shapes and len(shapes[k].shape) == 1 and np.ndim(v) == 2:
            v = np.diagonal(v)
        out[k] = v
    return out


class NestedFit(NamedTuple):
    """Outcome of :func:`fit_nested`."""

    init: dict  # factor-analysis starting values of the LDS
    lds: EMResult
    rbf: EMResult
    centres: jax.Array
    widths: jax.Array


def fit_nested(
    rng_key,
    *,
    y,
    u=None,
    state_dim: int,
    num_centres: int = 11,
    lds_iters: int = 50,
    rbf_iters: int = 20,
    ridge: float = 1e-3,
    rbf_e_step=None,
    progress_bar: bool = True,
    map_estimate: bool = False,
    max_spectral_radius: Optional[float] = None,
    **model_kwargs,
) -> NestedFit:
    """Factor analysis -> LDS by EM (Kalman) -> RBF model by EM, in one call.

    The RBF centres are a grid over the LDS's smoothed states (:func:`rbf_grid`); the
    RBF model starts from the LDS (RBF weights zero) and is fitted with
    ``rbf_e_step`` (default :class:`ExtendedKalmanSmoother`) and the closed-form M-step
    with ``ridge`` on the RBF weights. ``model_kwargs`` (e.g. ``bias``,
    ``dynamics_noise``) go to both models. ``map_estimate`` runs both stages as MAP-EM
    with the models' priors (:class:`LinearGaussianMStep`); ``max_spectral_radius``
    bounds the spectral radius of the RBF dynamics' linear part (bounded forecasts).

    Example:
        >>> fit = fit_nested(jax.random.key(0), y=y, u=u, state_dim=1)  # doctest: +SKIP
        >>> fit.rbf.log_marginals[-1] > fit.lds.log_marginals[-1]        # doctest: +SKIP
    """
    from ppl_dyn.models import lds, rbf, rbf_grid

    k_lds, k_rbf = jax.random.split(rng_key)
    data = validate_data({"y": y, "u": u} if u is not None else {"y": y})
    kw = {**data, "state_dim": state_dim, **model_kwargs}
    init = _fit_diagonals(lds, factor_analysis_init(y, u, state_dim=state_dim), kw)
    lds_fit = EM(lds, KalmanSmoother(), LinearGaussianMStep(map_estimate=map_estimate)).run(
        k_lds, lds_iters, init=init, progress_bar=progress_bar, **kw
    )
    post = KalmanSmoother().smooth(lds_fit.params, lds, **kw)
    centres, widths = rbf_grid(np.asarray(post.means), num_centres)
    e_step = ExtendedKalmanSmoother() if rbf_e_step is None else rbf_e_step
    rbf_kw = {**kw, "centres": centres, "widths": widths}
    m_step = LinearGaussianMStep(
        ridge=ridge, map_estimate=map_estimate, max_spectral_radius=max_spectral_radius
    )
    rbf_fit = EM(rbf, e_step, m_step).run(
        k_rbf, rbf_iters, init=lds_fit, progress_bar=progress_bar, **rbf_kw
    )
    return NestedFit(init, lds_fit, rbf_fit, jnp.asarray(centres), jnp.asarray(widths))


__all__ = ["factor_analysis_init", "fit_nested", "NestedFit"]
