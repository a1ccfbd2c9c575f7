"""Exact Kalman filter and Rauch-Tung-Striebel smoother (the LDS E-step).

Conventions (``docs/math.md``): ``x_1 ~ N(m0, P0)``; ``x_t = F x_{t-1} + c_t + w_t``
for ``t >= 2``; ``y_t = H x_t + e_t + v_t``. Before anything runs,
:func:`~ppl_dyn.requirements.linear_gaussian_form` proves from the traced program that
the model's means are affine in the state and its covariances independent of it (or
raises, naming the smoother that fits); the matrices are then read off the means by
``jax.jacfwd`` (exact for affine maps), once, or at every step where they change with
the inputs (``H_t = u_t^T``, ``F_t = F(u_t)``).

Numerics: Joseph-form filter update, a Joseph-form backward conditional covariance in
the smoother (a sum of positive semi-definite terms), explicit symmetrisation, Cholesky
solves only. Missing observations (NaN, element-wise) drop out of the update exactly:
the rows of ``H`` and the residual are zeroed and the missing block of the innovation
covariance is replaced by the identity, which adds nothing to the log-density.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._pattern import COMPLETE, MIXED, RAGGED, SHARED
from ppl_dyn.infer.stats import gaussian_linear_statistics
from ppl_dyn.requirements import LinearGaussianForm, gaussian_moments, linear_gaussian_form
from ppl_dyn.state_space import StateSpace, mask_covariance

_LOG2PI = 1.8378770664093453


class LinearGaussianView(NamedTuple):
    """The affine-Gaussian form of one sequence's model.

    ``F``, ``Q``, ``H``, ``R`` carry a leading time axis ``T`` when they change with the
    inputs (``F[t]``, ``Q[t]`` enter ``x_t``; ``F[0]``, ``Q[0]`` are unused)."""

    m0: jax.Array  # (dx,)
    P0: jax.Array  # (dx, dx)
    F: jax.Array  # (dx, dx) or (T, dx, dx)
    c: jax.Array  # (T, dx) transition offsets; c[t] enters x_t (c[0] unused)
    Q: jax.Array  # (dx, dx) or (T, dx, dx)
    H: jax.Array  # (dy, dx) or (T, dy, dx)
    e: jax.Array  # (T, dy) emission offsets
    R: jax.Array  # (dy, dy) or (T, dy, dy)


class GaussianPosterior(NamedTuple):
    """Smoothed Gaussian marginals of one or several sequences.

    Leading axis ``S`` when the data had a sequence axis.

    Attributes:
        means: ``E[x_t | y_{1:T}]``, ``(T, dx)``.
        covs: ``Cov[x_t | y_{1:T}]``, ``(T, dx, dx)``.
        cross_covs: ``Cov[x_{t+1}, x_t | y_{1:T}]``, ``(T-1, dx, dx)``.
        filtered_means, filtered_covs: ``E/Cov[x_t | y_{1:t}]``.
        predicted_log_probs: ``log p(y_t | y_{1:t-1})`` per step (observed entries only).
        log_marginal: ``log p(y_{1:T})`` (sum of ``predicted_log_probs``).
    """

    means: jax.Array
    covs: jax.Array
    cross_covs: jax.Array
    filtered_means: jax.Array
    filtered_covs: jax.Array
    predicted_log_probs: jax.Array
    log_marginal: jax.Array

    def linear_statistics(self, ss, y, u, time_mask=None, data_pattern=None):
        """Expected sufficient statistics of the closed-form M-step: Gaussian moments of
        the model's features under these marginals and pairs
        (:func:`~ppl_dyn.infer.stats.gaussian_linear_statistics`)."""
        return gaussian_linear_statistics(self, ss, y, u, time_mask, data_pattern)


def linear_gaussian_view(
    ss: StateSpace, u: jax.Array, form: Optional[LinearGaussianForm] = None
) -> LinearGaussianView:
    """Affine-Gaussian form of a state space for one input sequence ``u`` ``(T, du)``.

    ``form`` (from :func:`~ppl_dyn.requirements.linear_gaussian_form`, which proves that
    the means are affine in the state and the covariances independent of it; computed
    here when not given) says which matrices change with the inputs: those are read at
    every step (``(T, ., .)``: ``F[t]`` maps ``x_{t-1}`` to ``x_t``), the others once.
    Offsets ``c``, ``e`` are always per step. Read off the model's distributions, not a
    declared :class:`~ppl_dyn.LinearStructure`: a mean with terms the declaration does
    not name (tests/test_bad_input.py's ``fragile_lds``) is still filtered exactly."""
    dtype = u.dtype
    if form is None:
        form = linear_gaussian_form(ss, dtype=dtype)
    x0 = jnp.zeros((ss.state_dim,), dtype)
    m0, P0 = gaussian_moments(ss.init, "initial state distribution")

    def at(fn, varies):
        return jax.vmap(fn)(u) if varies else fn(u[0])

    F = at(lambda ut: jax.jacfwd(lambda x: ss.transition_mean(x, ut))(x0), form.F_varies)
    H = at(lambda ut: jax.jacfwd(lambda x: ss.emission_mean(x, ut))(x0), form.H_varies)
    c = jax.vmap(lambda ut: ss.transition_mean(x0, ut))(u)
    e = jax.vmap(lambda ut: ss.emission_mean(x0, ut))(u)
    Q = at(lambda ut: gaussian_moments(ss.transition(x0, ut), "transition")[1], form.Q_varies)
    R = at(lambda ut: gaussian_moments(ss.emission(x0, ut), "emission")[1], form.R_varies)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return LinearGaussianView(*map(cast, (m0, P0, F, c, Q, H, e, R)))


def is_time_varying(view: LinearGaussianView) -> bool:
    """Whether a view carries per-step matrices (known at trace time)."""
    return view.F.ndim == 3 or view.Q.ndim == 3 or view.H.ndim == 3 or view.R.ndim == 3


def per_step(view: LinearGaussianView) -> LinearGaussianView:
    """``view`` with ``F``, ``Q``, ``H`` and ``R`` broadcast to one per step."""
    T = view.c.shape[0]

    def full(a):
        return a if a.ndim == 3 else jnp.broadcast_to(a, (T,) + a.shape)

    return view._replace(F=full(view.F), Q=full(view.Q), H=full(view.H), R=full(view.R))


def masked_emission(H, R, mask):
    """Rows of ``H`` zeroed and the missing block of ``R`` replaced by the identity."""
    return H * mask.astype(H.dtype)[:, None], mask_covariance(R, mask)


def covariance_update(m_pred, P_pred, H, e_t, R, y_t, mask_t):
    """Joseph-form measurement update of ``N(m_pred, P_pred)`` with ``y_t = H x + e_t + v``,
    ``v ~ N(0, R)``; entries where ``mask_t`` is False are missing (``y_t`` zero-filled).
    ``mask_t`` None: every entry observed (known at trace time; no masking to trace).

    Returns the filtered mean and covariance and ``log N(y_t; H m_pred + e_t, S_t)`` over
    the observed entries.
    """
    if mask_t is None:
        Ht, Rt = H, R
        r = y_t - la.mv(H, m_pred) - e_t
        n_obs = y_t.shape[-1]
    else:
        Ht, Rt = masked_emission(H, R, mask_t)
        r = jnp.where(mask_t, y_t - la.mv(Ht, m_pred) - e_t, 0.0)
        n_obs = jnp.sum(mask_t)
    PHt = la.mm(P_pred, Ht.T)
    L = la.cholesky(la.sym(la.mm(Ht, PHt) + Rt))
    K = la.cho_solve(L, PHt.T).T
    m_f = m_pred + la.mv(K, r)
    IKH = jnp.eye(m_pred.shape[-1], dtype=P_pred.dtype) - la.mm(K, Ht)
    P_f = la.sym(la.mm(la.mm(IKH, P_pred), IKH.T) + la.mm(la.mm(K, Rt), K.T))
    z = la.solve_lower(L, r)
    ll = -0.5 * (jnp.sum(z * z) + la.log_det_from_cholesky(L) + n_obs * _LOG2PI)
    return m_f, P_f, ll


def kalman_filter(view: LinearGaussianView, y: jax.Array, complete: bool = False):
    """Forward pass. Returns predicted and filtered moments and per-step log-densities.

    Uses the covariance (Joseph) form when ``obs_dim <= state_dim`` and the information
    form otherwise, so that the work inside the time loop never scales with ``obs_dim``
    beyond ``state_dim``. ``complete``: ``y`` has no missing entry (known when the
    program is traced): the masks are not traced.
    """
    if is_time_varying(view):
        return _filter_time_varying(per_step(view), y)
    if view.H.shape[0] > view.F.shape[0]:
        return _filter_information(view, y, complete)
    return _filter_covariance(view, y, complete)


def _filter_time_varying(view: LinearGaussianView, y: jax.Array):
    """Covariance-form filter with per-step ``F``, ``Q``, ``H``, ``R`` (``(T, ., .)``)."""
    mask = ~jnp.isnan(y)
    nxt = lambda a: jnp.concatenate([a[1:], jnp.zeros_like(a[:1])], 0)  # noqa: E731
    inputs = (jnp.where(mask, y, 0.0), mask, view.e, view.H, view.R)
    inputs = inputs + (nxt(view.c), nxt(view.F), nxt(view.Q))

    def step(carry, inp):
        m_pred, P_pred = carry
        y_t, mask_t, e_t, H_t, R_t, c_n, F_n, Q_n = inp
        m_f, P_f, ll = covariance_update(m_pred, P_pred, H_t, e_t, R_t, y_t, mask_t)
        m_next = la.mv(F_n, m_f) + c_n
        P_next = la.sym(la.mm(la.mm(F_n, P_f), F_n.T) + Q_n)
        return (m_next, P_next), (m_pred, P_pred, m_f, P_f, ll)

    _, (m_p, P_p, m_f, P_f, ll) = jax.lax.scan(step, (view.m0, view.P0), inputs)
    return m_p, P_p, m_f, P_f, ll


def _filter_covariance(view: LinearGaussianView, y: jax.Array, complete: bool = False):
    F, FT, Q = view.F, view.F.T, view.Q
    c_next = jnp.concatenate([view.c[1:], jnp.zeros_like(view.c[:1])], 0)
    if complete:  # no missing entry (known at trace time): no masks
        inputs = (y, view.e, c_next)
    else:
        mask = ~jnp.isnan(y)
        inputs = (jnp.where(mask, y, 0.0), view.e, c_next, mask)

    def step(carry, inp):
        m_pred, P_pred = carry
        y_t, e_t, c_n, *mask_t = inp
        mask_t = mask_t[0] if mask_t else None
        m_f, P_f, ll = covariance_update(m_pred, P_pred, view.H, e_t, view.R, y_t, mask_t)
        m_next = la.mv(F, m_f) + c_n
        P_next = la.sym(la.mm(la.mm(F, P_f), FT) + Q)
        return (m_next, P_next), (m_pred, P_pred, m_f, P_f, ll)

    _, (m_p, P_p, m_f, P_f, ll) = jax.lax.scan(step, (view.m0, view.P0), inputs)
    return m_p, P_p, m_f, P_f, ll


def _information_update(P_pred, G, eye):
    """Information-form measurement update of the covariance with ``G = W^T W`` (the
    whitened emission): ``P_f = Lp (I + Lp^T G Lp)^{-1} Lp^T = B^T B`` with
    ``P_pred = Lp Lp^T``, no inverse of ``P`` (well conditioned, PSD). Returns
    ``(B, P_f, Lm)``, ``Lm`` the factor of ``I + Lp^T G Lp`` (its log-determinant is the
    innovation's, minus ``log|R|``)."""
    Lp = la.cholesky(P_pred)
    Lm = la.cholesky(la.sym(eye + la.mm(la.mm(Lp.T, G), Lp)))
    B = la.solve_lower(Lm, Lp.T)
    return B, la.mm(B.T, B), Lm


def _filter_information(view: LinearGaussianView, y: jax.Array, complete: bool = False):
    """Information-form update: per step only state-sized factorisations.

    With ``Rt = LR LR^T`` the masked emission covariance, the whitened ``W_t = LR^{-1} H_t``,
    ``v_t = LR^{-1}(y_t - e_t)`` and ``G_t = W_t^T W_t`` are computed for all t at once
    outside the loop; then
    ``P_f = (P^{-1} + G)^{-1} = L (I + L^T G L)^{-1} L^T`` with ``P = L L^T`` (no inverse
    of ``P``), ``m_f = m + P_f (g - G m)``, and the innovation density follows from
    Woodbury and the determinant lemma ``|S| = |Rt| |I + L^T G L|``.
    """
    dx = view.F.shape[0]
    dtype = view.F.dtype
    mask = ~jnp.isnan(y)
    resid0 = jnp.where(mask, y - view.e, 0.0)  # y_t - e_t, zero where missing
    n_obs = jnp.sum(mask, -1).astype(dtype)
    if complete:
        # no missing entries (known at trace time): one factor of R for all steps. Its
        # time-vectorised form below is the bulk of this function's compile time. Outside
        # the loop: library calls (unrolled, they took 0.7 s of compile at dy = 10)
        LR = la.cholesky(view.R, in_loop=False)
        W_c = la.solve_lower(LR, view.H, in_loop=False)
        G_c = la.mm(W_c.T, W_c)
        v = la.solve_lower(LR, resid0.T, in_loop=False).T
        const = jnp.broadcast_to(la.log_det_from_cholesky(LR) + n_obs * _LOG2PI, n_obs.shape)
        per_step = ()
    else:
        Ht, Rt = jax.vmap(masked_emission, in_axes=(None, None, 0))(view.H, view.R, mask)
        LR = la.cholesky(Rt)  # (T, dy, dy), vectorised over time outside the loop
        W = la.solve_lower(LR, Ht)  # LR^{-1} H_t
        v = la.solve_lower(LR, resid0)
        G = jnp.einsum("tki,tkj->tij", W, W)
        const = la.log_det_from_cholesky(LR) + n_obs * _LOG2PI
        per_step = (W, G)
    eye = jnp.eye(dx, dtype=dtype)
    F, FT, Q = view.F, view.F.T, view.Q
    c_next = jnp.concatenate([view.c[1:], jnp.zeros_like(view.c[:1])], 0)

    def step(carry, inp):
        m_pred, P_pred = carry
        v_t, const_t, c_n, *rest = inp
        W_t, G_t = rest if rest else (W_c, G_c)
        B, P_f, Lm = _information_update(P_pred, G_t, eye)
        r_w = v_t - la.mv(W_t, m_pred)  # whitened residual LR^{-1}(y - H m - e)
        cb = la.mv(B, la.mv(W_t.T, r_w))
        m_f = m_pred + la.mv(B.T, cb)
        quad = jnp.sum(r_w * r_w) - jnp.sum(cb * cb)
        ll = -0.5 * (quad + const_t + la.log_det_from_cholesky(Lm))
        m_next = la.mv(F, m_f) + c_n
        P_next = la.sym(la.mm(la.mm(F, P_f), FT) + Q)
        return (m_next, P_next), (m_pred, P_pred, m_f, P_f, ll)

    _, (m_p, P_p, m_f, P_f, ll) = jax.lax.scan(
        step, (view.m0, view.P0), (v, const, c_next) + per_step
    )
    return m_p, P_p, m_f, P_f, ll


def rts_covariance(F, Q, P_s_next, P_f_t, P_p_next):
    """Covariance half of an RTS step: gain ``J_t``, smoothed ``P_t`` and the
    cross-covariance ``Cov[x_{t+1}, x_t | y] = P_{t+1} J_t^T``."""
    Lp = la.cholesky(P_p_next)
    J = la.cho_solve(Lp, la.mm(F, P_f_t)).T  # P_f F^T P_p^{-1}
    IJF = jnp.eye(F.shape[-1], dtype=F.dtype) - la.mm(J, F)
    JT = J.T
    # Joseph form of the backward conditional covariance, plus J P_s J^T
    P_s = la.sym(
        la.mm(la.mm(IJF, P_f_t), IJF.T) + la.mm(la.mm(J, Q), JT) + la.mm(la.mm(J, P_s_next), JT)
    )
    return J, P_s, la.mm(P_s_next, JT)


def rts_step(F, Q, carry, inp):
    """One RTS backward step for ``x_{t+1} = F x_t + c + w``, ``w ~ N(0, Q)``.

    ``carry`` holds the smoothed moments at ``t+1``, ``inp`` the filtered moments at
    ``t`` and the predicted ones at ``t+1``. Returns the smoothed moments at ``t`` and
    the cross-covariance ``Cov[x_{t+1}, x_t | y] = P_{t+1} J_t^T``.
    """
    m_s_next, P_s_next = carry
    m_f_t, P_f_t, m_p_next, P_p_next = inp
    J, P_s, cross = rts_covariance(F, Q, P_s_next, P_f_t, P_p_next)
    m_s = m_f_t + la.mv(J, m_s_next - m_p_next)
    return (m_s, P_s), (m_s, P_s, cross)


def masked_rts_step(F, Q, carry, inp, valid_next):
    """:func:`rts_step`, restarted where step ``t+1`` lies past the sequence's end
    (``valid_next`` False): there the smoothed moments at ``t`` are the filtered ones and
    the cross-covariance is 0, whatever the padded steps hold (even inf or NaN)."""
    (m_s, P_s), (_, _, cross) = rts_step(F, Q, carry, inp)
    m_s = jnp.where(valid_next, m_s, inp[0])
    P_s = jnp.where(valid_next, P_s, inp[1])
    cross = jnp.where(valid_next, cross, 0.0)
    return (m_s, P_s), (m_s, P_s, cross)


def rts_smoother(view: LinearGaussianView, m_p, P_p, m_f, P_f, time_mask=None):
    """Backward pass with lag-one cross-covariances ``Cov[x_{t+1}, x_t | y]``.

    ``time_mask`` ``(T,)``: False past the sequence's end (ragged lengths); the pass then
    starts at the last step inside (see :func:`masked_rts_step`). Per-step ``F``/``Q``
    (a time-varying view) enter step ``t`` as ``F[t+1]``, ``Q[t+1]``."""
    inputs = (m_f[:-1], P_f[:-1], m_p[1:], P_p[1:])
    varying = view.F.ndim == 3 or view.Q.ndim == 3
    if varying:
        T = m_f.shape[0]
        full = lambda a: a if a.ndim == 3 else jnp.broadcast_to(a, (T,) + a.shape)  # noqa: E731
        inputs = inputs + (full(view.F)[1:], full(view.Q)[1:])
    else:
        inputs = inputs + (None, None)
    valid = None if time_mask is None else time_mask[1:]

    def step(carry, inp):
        m_f_t, P_f_t, m_p_n, P_p_n, F_n, Q_n, *v = inp
        F_n = view.F if F_n is None else F_n
        Q_n = view.Q if Q_n is None else Q_n
        moments = (m_f_t, P_f_t, m_p_n, P_p_n)
        if not v:
            return rts_step(F_n, Q_n, carry, moments)
        return masked_rts_step(F_n, Q_n, carry, moments, v[0])

    if valid is not None:
        inputs = inputs + (valid,)
    last = (m_f[-1], P_f[-1])
    _, (m_s, P_s, cross) = jax.lax.scan(step, last, inputs, reverse=True)
    means = jnp.concatenate([m_s, m_f[-1:]], 0)
    covs = jnp.concatenate([P_s, P_f[-1:]], 0)
    return means, covs, cross


def kalman_smooth_view(
    view: LinearGaussianView,
    y: jax.Array,
    time_mask: Optional[jax.Array] = None,
    complete: bool = False,
) -> GaussianPosterior:
    """Filter + RTS for one sequence ``y`` ``(T, dy)`` (NaN = missing).

    ``time_mask`` ``(T,)`` (ragged lengths): steps where it is False lie past the
    sequence's end (``y`` NaN there); they add exactly 0 to the log-marginal, the
    smoother restarts at the last step inside, and the moments returned past the end are
    the filter's predictions. ``complete``: see :func:`kalman_filter`."""
    m_p, P_p, m_f, P_f, ll = kalman_filter(view, y, complete)
    if time_mask is not None:
        ll = jnp.where(time_mask, ll, 0.0)
    means, covs, cross = rts_smoother(view, m_p, P_p, m_f, P_f, time_mask)
    return GaussianPosterior(means, covs, cross, m_f, P_f, ll, jnp.sum(ll))


def _covariance_pass(view: LinearGaussianView, mask: jax.Array, valid=None, whole_rows=False):
    """The data-independent half of the filter and smoother for one missing-data pattern
    ``mask`` ``(T, dy)``: gains, innovation whitening and smoothed covariances. Shared by
    every sequence with that pattern (the means are a separate, linear pass). ``valid``
    ``(T,)``: False past the sequence's end (the smoother restarts there; ``J = 0``).

    Returns ``(P_f, K, Z1, Z2, logdet, J, covs, cross)``: the innovation ``r_t`` has
    ``r^T S_t^{-1} r = |Z1_t r|^2 - |Z2_t r|^2`` and ``log|S_t| = logdet_t``. With
    ``obs_dim > state_dim`` and ``whole_rows`` (each step fully observed or fully missing:
    the caller knows) the information form is used, as in :func:`kalman_filter`: one
    factor of ``R`` for all steps and only state-sized factors inside the loop
    (``Z1 = LR^{-1}``, ``Z2 = B W^T LR^{-1}`` with ``P_f = B^T B``, ``W = LR^{-1} H``:
    Woodbury). Otherwise the covariance form (``Z1 = L_S^{-1}``, ``Z2`` empty)."""
    eye = jnp.eye(view.F.shape[0], dtype=view.F.dtype)
    F, FT, Q = view.F, view.F.T, view.Q
    dx, dy = view.H.shape[1], view.H.shape[0]
    T = mask.shape[0]

    if whole_rows and dy > dx:
        LR = la.cholesky(view.R, in_loop=False)
        LRinv = la.solve_lower(LR, jnp.eye(dy, dtype=LR.dtype), in_loop=False)
        W = la.mm(LRinv, view.H)  # (dy, dx)
        G = la.mm(W.T, W)
        WtLi = la.mm(W.T, LRinv)  # (dx, dy)
        logdetR = la.log_det_from_cholesky(LR)

        def fstep(P_pred, mask_t):
            o = mask_t[0]  # whole rows: observed or not
            B, P_f, Lm = _information_update(P_pred, jnp.where(o, G, 0.0), eye)
            Z2 = jnp.where(o, la.mm(B, WtLi), 0.0)  # (dx, dy)
            K = la.mm(B.T, Z2)  # P_f H^T R^{-1}
            logdet = jnp.where(o, logdetR, 0.0) + la.log_det_from_cholesky(Lm)
            P_next = la.sym(la.mm(la.mm(F, P_f), FT) + Q)
            return P_next, (P_pred, P_f, K, Z2, logdet)

        _, (P_p, P_f, K, Z2, logdet) = jax.lax.scan(fstep, view.P0, mask)
        Z1 = jnp.broadcast_to(LRinv, (T, dy, dy))
    else:

        def fstep(P_pred, mask_t):
            Ht, Rt = masked_emission(view.H, view.R, mask_t)
            PHt = la.mm(P_pred, Ht.T)
            L = la.cholesky(la.sym(la.mm(Ht, PHt) + Rt))
            K = la.cho_solve(L, PHt.T).T
            IKH = eye - la.mm(K, Ht)
            P_f = la.sym(la.mm(la.mm(IKH, P_pred), IKH.T) + la.mm(la.mm(K, Rt), K.T))
            P_next = la.sym(la.mm(la.mm(F, P_f), FT) + Q)
            Linv = la.solve_lower(L, jnp.eye(L.shape[-1], dtype=L.dtype))
            return P_next, (P_pred, P_f, K, Linv, la.log_det_from_cholesky(L))

        _, (P_p, P_f, K, Z1, logdet) = jax.lax.scan(fstep, view.P0, mask)
        Z2 = jnp.zeros((T, 0, dy), Z1.dtype)

    valid = jnp.ones(mask.shape[:1], bool) if valid is None else valid

    def bstep(P_s_next, inp):
        P_f_t, P_p_next, v = inp
        J, P_s, cross = rts_covariance(F, Q, P_s_next, P_f_t, P_p_next)
        P_s = jnp.where(v, P_s, P_f_t)
        return P_s, (P_s, jnp.where(v, cross, 0.0), jnp.where(v, J, 0.0))

    _, (P_s, cross, J) = jax.lax.scan(bstep, P_f[-1], (P_f[:-1], P_p[1:], valid[1:]), reverse=True)
    covs = jnp.concatenate([P_s, P_f[-1:]], 0)
    return P_f, K, Z1, Z2, logdet, J, covs, cross


def _rows_times(m, A):
    """``m @ A.T`` for ``m`` ``(S, d)`` and a small ``A`` ``(d', d)``: element-wise and
    fused inside a time loop (a separate ``dot`` per step costs more than the work)."""
    if la._small(*A.shape):  # the size rule of _linalg's fused products
        return jnp.sum(m[:, None, :] * A[None, :, :], -1)
    return m @ A.T


def kalman_smooth_shared(
    view: LinearGaussianView, c, e, y: jax.Array, complete: bool = False
) -> GaussianPosterior:
    """Filter + RTS for ``S`` sequences ``y`` ``(S, T, dy)`` that share the parameters
    and the missing-data pattern (offsets ``c``, ``e`` ``(S, T, dim)`` may differ): one
    covariance pass, then the means of all sequences together.

    With the gains fixed, the means follow affine recursions. Filter:
    ``m_f,t = G_t m_p,t + g_t`` with ``G_t = I - K_t H_t`` and ``g_t = K_t (y_t - e_t)``
    (missing entries zero), so ``m_p,t+1 = F G_t m_p,t + (F g_t + c_t+1)``. Smoother:
    ``m_s,t = J_t m_s,t+1 + (m_f,t - J_t m_p,t+1)``. Everything but the two recursions is
    computed for all steps at once; each loop step is one small product. ``complete``:
    no missing entry at all (known when the program is traced)."""
    S = y.shape[0]
    mask = ~jnp.isnan(y)
    P_f, K, Z1, Z2, logdet, J, covs, cross = _covariance_pass(view, mask[0], whole_rows=complete)
    F, H = view.F, view.H
    dtype = F.dtype
    n_obs = jnp.sum(mask[0], -1).astype(dtype)
    c_next = jnp.concatenate([c[:, 1:], jnp.zeros_like(c[:, :1])], 1)
    m_obs = mask[0].astype(dtype)  # (T, dy)
    Ht = m_obs[:, :, None] * H[None]  # (T, dy, dx): missing rows zeroed
    resid0 = jnp.where(mask, y - e, 0.0)  # (S, T, dy)
    eye = jnp.eye(F.shape[0], dtype=dtype)
    G = eye - jnp.einsum("tij,tjk->tik", K, Ht)  # (T, dx, dx)
    g = jnp.einsum("tij,stj->sti", K, resid0)  # (S, T, dx)
    A = jnp.einsum("ij,tjk->tik", F, G)
    b = jnp.einsum("ij,stj->sti", F, g) + c_next
    tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  (S, T, .) -> (T, S, .)

    def fstep(m_pred, inp):
        A_t, b_t = inp
        return _rows_times(m_pred, A_t) + b_t, m_pred

    m0 = jnp.broadcast_to(view.m0, (S, view.m0.shape[0]))
    _, m_p = jax.lax.scan(fstep, m0, (A, tm(b)))
    m_p = tm(m_p)  # (S, T, dx)
    r = resid0 - jnp.einsum("tij,stj->sti", Ht, m_p)
    m_f = m_p + jnp.einsum("tij,stj->sti", K, r)
    z1 = jnp.einsum("tij,stj->sti", Z1, r)
    z2 = jnp.einsum("tij,stj->sti", Z2, r)
    quad = jnp.sum(z1 * z1, -1) - jnp.sum(z2 * z2, -1)  # r^T S^{-1} r
    ll = -0.5 * (quad + logdet + n_obs * _LOG2PI)  # (S, T)

    b_s = m_f[:, :-1] - jnp.einsum("tij,stj->sti", J, m_p[:, 1:])

    def bstep(m_s_next, inp):
        J_t, b_t = inp
        m_s = _rows_times(m_s_next, J_t) + b_t
        return m_s, m_s

    _, m_s = jax.lax.scan(bstep, m_f[:, -1], (J, tm(b_s)), reverse=True)
    means = jnp.concatenate([tm(m_s), m_f[:, -1:]], 1)
    bc = lambda a: jnp.broadcast_to(a, (S,) + a.shape)  # noqa: E731
    return GaussianPosterior(means, bc(covs), bc(cross), m_f, bc(P_f), ll, jnp.sum(ll, -1))


def _ragged_pays(y, dx: int) -> bool:
    """Whether one covariance pass per possible length (``T + 1`` passes, kept in memory)
    is cheaper than one per sequence: at least 4 sequences per length, and the per-length
    gains under ``2**25`` numbers (static shapes: decided at trace time)."""
    S, T, dy = y.shape
    return 4 * (T + 1) <= S and (T + 1) * T * dx * (dx + dy) <= 2**25


def kalman_smooth_ragged(view: LinearGaussianView, c, e, y, time_mask) -> GaussianPosterior:
    """Filter + RTS for ``S`` sequences of different lengths, each fully observed up to
    its end (``y`` ``(S, T, dy)`` NaN past it, ``time_mask`` ``(S, T)``; the ``"ragged"``
    pattern). The covariances depend on the length only: one covariance pass per
    possible length ``0..T`` (``(T + 1) T`` steps instead of ``S T``), then the means of
    all sequences together, each with the gains of its length."""
    S, T, dy = y.shape
    lengths = jnp.sum(time_mask, -1).astype(jnp.int32)  # (S,)
    valid = jnp.arange(T)[None, :] < jnp.arange(T + 1)[:, None]  # (T + 1, T): by length
    masks = jnp.broadcast_to(valid[..., None], (T + 1, T, dy))
    P_f, K, Z1, Z2, logdet, J, covs, cross = jax.vmap(
        lambda m, v: _covariance_pass(view, m, v, whole_rows=True)  # rows: in or past the end
    )(masks, valid)
    F, H = view.F, view.H
    dtype = F.dtype
    n_obs = jnp.sum(masks, -1).astype(dtype)  # (T + 1, T)
    mask = ~jnp.isnan(y)
    yf = jnp.where(mask, y, 0.0)
    tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  (S or T+1, T, .) -> (T, ., .)
    c_next = jnp.concatenate([c[:, 1:], jnp.zeros_like(c[:, :1])], 1)

    def fstep(m_pred, inp):
        y_t, mask_t, v_t, e_t, cn_t, K_t, Z1_t, Z2_t, ld_t, n_t = inp
        K_s = K_t[lengths]  # the gains of each sequence's length
        r = jnp.where(mask_t, y_t - m_pred @ H.T - e_t, 0.0)  # (S, dy)
        m_f = m_pred + jnp.einsum("sij,sj->si", K_s, r)
        z1 = jnp.einsum("sij,sj->si", Z1_t[lengths], r)
        z2 = jnp.einsum("sij,sj->si", Z2_t[lengths], r)
        quad = jnp.sum(z1 * z1, -1) - jnp.sum(z2 * z2, -1)
        ll = -0.5 * (quad + ld_t[lengths] + n_t[lengths] * _LOG2PI)
        return m_f @ F.T + cn_t, (m_pred, m_f, jnp.where(v_t, ll, 0.0))

    m0 = jnp.broadcast_to(view.m0, (S, view.m0.shape[0]))
    inputs = (tm(yf), tm(mask), tm(time_mask), tm(e), tm(c_next), tm(K), tm(Z1), tm(Z2))
    _, (m_p, m_f, ll) = jax.lax.scan(fstep, m0, inputs + (tm(logdet), tm(n_obs)))

    def bstep(m_s_next, inp):
        m_f_t, m_p_next, J_t, v_next = inp
        m_s = m_f_t + jnp.einsum("sij,sj->si", J_t[lengths], m_s_next - m_p_next)
        m_s = jnp.where(v_next[:, None], m_s, m_f_t)  # restart at each end
        return m_s, m_s

    _, m_s = jax.lax.scan(
        bstep, m_f[-1], (m_f[:-1], m_p[1:], tm(J), tm(time_mask)[1:]), reverse=True
    )
    means = jnp.concatenate([m_s, m_f[-1:]], 0)
    ll = tm(ll)
    gather = lambda a: a[lengths]  # noqa: E731
    return GaussianPosterior(
        tm(means), gather(covs), gather(cross), tm(m_f), gather(P_f), ll, jnp.sum(ll, -1)
    )


class KalmanSmoother(NamedTuple):
    """Exact E-step for linear-Gaussian models: Kalman filter + RTS smoother.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import KalmanSmoother
        >>> sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=20,
        ...                        state_dim=2, obs_dim=1)
        >>> post = KalmanSmoother().smooth(sim["params"], lds, y=sim["y"], state_dim=2)
        >>> post.means.shape
        (20, 2)

    ``data_pattern``: the missing-data pattern of the data (``ppl_dyn.infer._pattern``),
    set by the drivers (``EM``, ``smooth``) through :meth:`with_data_pattern`, which know
    the data: only the code path for that pattern is traced. None (the default, and
    inside a user's own ``jit``): every path is traced and the data choose at run time.
    """

    data_pattern: Optional[str] = None

    def with_data_pattern(self, pattern: Optional[str]) -> "KalmanSmoother":
        """This E-step told the missing-data pattern of the data it will see."""
        return self._replace(data_pattern=pattern)

    # its programs are small-matrix work: the drivers' compile configuration picks the
    # XLA options for that (``ppl_dyn.infer._compile.compiler_options``)
    small_matrix_programs = True

    def posterior(
        self,
        rng_key,
        ss: StateSpace,
        y: jax.Array,
        u: jax.Array,
        time_mask: Optional[jax.Array] = None,
    ):
        """Pure E-step on normalised data ``y`` ``(S, T, dy)``, ``u`` ``(S, T, du)``.

        ``time_mask`` ``(S, T)``: False past each sequence's end (ragged lengths; ``y``
        is NaN there). NaN padding alone already leaves the posterior of the observed
        span and the log-marginal unchanged; the mask makes that hold however the padded
        steps behave numerically (see :func:`kalman_smooth_view`)."""
        del rng_key  # exact: no randomness
        # proves the model linear-Gaussian (or raises, naming what fits): trace time only
        form = linear_gaussian_form(ss, "KalmanSmoother", dtype=y.dtype)
        hint = self.data_pattern
        complete = hint == COMPLETE

        def one(y_s, u_s, mask_s=None):
            view = linear_gaussian_view(ss, u_s, form)
            return kalman_smooth_view(view, y_s, mask_s, complete)

        if form.time_varying:  # matrices change with each sequence's inputs
            if time_mask is None:
                return jax.vmap(one)(y, u)
            return jax.vmap(one)(y, u, time_mask)
        if time_mask is not None and hint == RAGGED and _ragged_pays(y, ss.state_dim):
            # complete up to each end: covariances depend on the length only
            views = jax.vmap(lambda u_s: linear_gaussian_view(ss, u_s, form))(u)
            view0 = jax.tree_util.tree_map(lambda a: a[0], views)
            return kalman_smooth_ragged(view0, views.c, views.e, y, time_mask)
        if time_mask is not None and hint not in (COMPLETE, SHARED):
            # (COMPLETE / SHARED with a mask: the hint says that the mask is all True)
            return jax.vmap(one)(y, u, time_mask)
        if y.shape[0] == 1:  # one sequence: no batching pass to trace
            return jax.tree_util.tree_map(lambda a: a[None], one(y[0], u[0]))
        views = jax.vmap(lambda u_s: linear_gaussian_view(ss, u_s, form))(u)
        view0 = jax.tree_util.tree_map(lambda a: a[0], views)

        def shared():
            return kalman_smooth_shared(view0, views.c, views.e, y, complete)

        # sequences with the same missing-data pattern share every covariance; the
        # pattern is known at trace time under EM / smooth (only one path compiles)
        if hint in (COMPLETE, SHARED):
            return shared()
        if hint in (MIXED, RAGGED):
            return jax.vmap(one)(y, u)
        mask = jnp.isnan(y)
        same = jnp.all(mask == mask[:1])
        return jax.lax.cond(same, shared, lambda: jax.vmap(one)(y, u))

    def smooth(
        self,
        params: dict,
        model,
        *args,
        rng_key: Optional[jax.Array] = None,
        lengths=None,
        **kwargs,
    ) -> GaussianPosterior:
        """Smoothed posterior of the states of ``model`` at ``params``.

        Validates the data and parameters eagerly (clear ``ValueError``), then runs the
        jitted filter and smoother. Shapes follow ``y``: a leading sequence axis is kept
        when ``y`` has one.

        Sequences of different lengths: pass ``y`` (and ``u``) as lists of arrays, or
        padded arrays ``(S, T, dim)`` with ``lengths=`` ``(S,)``. The posterior is then
        padded to the longest sequence; past a sequence's end it holds the filter's
        predictions and ``predicted_log_probs`` is 0.
        """
        from ppl_dyn.infer._run import smooth_eager

        return smooth_eager(self, params, model, args, kwargs, rng_key, lengths)
