"""Linear dynamical system (linear-Gaussian state-space model)."""

from __future__ import annotations

import numpy as np

from ppl_dyn.models._linear_family import linear_in_params_model


def _identity(x):
    return x


def lds(
    y=None,
    *,
    u=None,
    num_steps=None,
    num_sequences=None,
    state_dim: int,
    obs_dim=None,
    bias: bool = True,
    dynamics_noise: str = "full",
    emission_noise: str = "full",
    init_noise: str = "full",
    identified: bool = False,
):
    r"""Linear dynamical system as a NumPyro model.

    .. math::
        x_1 \sim \mathcal N(m_0, P_0),\quad
        x_t \sim \mathcal N(A x_{t-1} + B u_t + b, Q),\quad
        y_t \sim \mathcal N(C x_t + D u_t + d, R)

    Args:
        y: observations, ``(T, obs_dim)`` or ``(S, T, obs_dim)``; NaN entries are missing.
        u: optional inputs ``(T, input_dim)`` or ``(S, T, input_dim)``; adds sites B, D.
        num_steps, num_sequences, obs_dim: sizes when simulating (``y=None``).
        state_dim: dimension of the latent state.
        bias: include the offsets ``b`` and ``d``.
        dynamics_noise, emission_noise, init_noise: ``"full"`` covariance matrices or
            ``"diag"`` (the site then holds a vector of variances).
        identified: the canonical form for posterior sampling (needs ``obs_dim >=
            state_dim``): ``Q = I``, ``C`` lower-trapezoidal with a positive diagonal
            (sites ``C_diag``, log-normal, and ``C_lower``; ``C`` and ``Q`` are
            deterministic sites) and no state offset ``b`` (with ``bias=True`` the
            offset is ``d``). Every LDS with a full-rank ``Q`` and ``C`` and no unit
            eigenvalue of ``A`` has exactly one such form (a Cholesky factor of ``Q``
            and an LQ factorisation of ``C`` give the change of state basis, a shift
            of the state removes ``b``: :func:`lds_canonical_params`), so the
            change-of-basis ridge, the offset ridge between ``b`` and ``d`` and the
            sign modes of the likelihood are gone. It
            declares no :class:`~ppl_dyn.LinearStructure` (the closed-form M-step cannot
            keep the constraints): fit by EM with the free form, then map the fit with
            :func:`lds_canonical_params`.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50,
        ...                        state_dim=2, obs_dim=3)
        >>> sim["y"].shape
        (50, 3)
    """
    return linear_in_params_model(
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        state_dim=state_dim,
        obs_dim=obs_dim,
        dynamics_feature="linear",
        emission_feature="linear",
        phi=_identity,
        psi=_identity,
        num_phi=state_dim,
        num_psi=state_dim,
        bias=bias,
        dynamics_noise=dynamics_noise,
        emission_noise=emission_noise,
        init_noise=init_noise,
        identified=identified,
    )


def lds_canonical_params(params: dict) -> dict:
    """The parameters of :func:`lds` (full ``Q``) in the identified form of
    ``lds(..., identified=True)``: the same distribution of the observations.

    With ``Q = L L^T`` and the QR factorisation ``(C L)^T = V U`` (signs chosen so that
    ``U`` has a positive diagonal), the new state is ``x' = M x`` with
    ``M = V^T L^{-1}``: then ``Q' = I``, ``C' = C M^{-1} = U^T`` is lower-trapezoidal
    with a positive diagonal, ``A' = M A M^{-1}``, ``B' = M B``, ``b' = M b``,
    ``m0' = M m0``, ``P0' = M P0 M^T``; then the shift ``x'' = x' + s`` with
    ``s = -(I - A')^{-1} b'`` removes the state offset: ``d'' = d - C' s``,
    ``m0'' = m0' + s``. Returns the sites of the identified model (``C_diag``,
    ``C_lower`` instead of ``C`` and ``Q``, no ``b``); use it to start NUTS from an EM
    fit.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    Q, C = p["Q"], p["C"]
    if Q.ndim != 2:
        raise ValueError("lds_canonical_params needs a full covariance Q (dynamics_noise='full')")
    dy, dx = C.shape
    if dy < dx:
        raise ValueError(f"the identified form needs obs_dim >= state_dim; C has shape {C.shape}")
    L = np.linalg.cholesky(Q)
    V, U = np.linalg.qr((C @ L).T)  # (C L)^T = V U, V (dx, dx), U (dx, dy)
    signs = np.sign(np.diag(U))
    signs[signs == 0] = 1.0
    V, U = V * signs[None, :], U * signs[:, None]
    M = V.T @ np.linalg.inv(L)
    Minv = L @ V
    out = {k: v for k, v in p.items() if k not in ("Q", "C")}
    out["A"] = M @ p["A"] @ Minv
    for name in ("B", "b", "m0"):
        if name in p:
            out[name] = M @ p[name]
    out["P0"] = M @ p["P0"] @ M.T if p["P0"].ndim == 2 else M @ np.diag(p["P0"]) @ M.T
    Cn = U.T  # (dy, dx) lower-trapezoidal, positive diagonal
    if "b" in out:  # shift the state so that its offset is 0
        s = -np.linalg.solve(np.eye(dx) - out["A"], out.pop("b"))
        out["d"] = out.get("d", np.zeros(dy)) - Cn @ s
        out["m0"] = out["m0"] + s
    out["C_diag"] = np.diag(Cn).copy()
    rows, cols = _lower_indices(dy, dx)
    out["C_lower"] = Cn[rows, cols]
    return out


def _lower_indices(dy: int, dx: int):
    """Row and column indices of the free entries below the diagonal of a ``(dy, dx)``
    lower-trapezoidal matrix."""
    rows, cols = np.nonzero(np.tril(np.ones((dy, dx)), -1))
    return rows, cols


# its LinearStructure is correct by construction (tests/test_user_models.py verifies it
# for every option): the run-time check of user declarations is skipped
lds._ppl_dyn_verified_structure = True
