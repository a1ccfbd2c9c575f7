"""State-space model with radial-basis-function dynamics (Ghahramani & Roweis)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ppl_dyn.features import rbf_features  # noqa: F401  (public here: ppl_dyn.models.rbf.rbf_features)
from ppl_dyn.models._linear_family import linear_in_params_model


def rbf_grid(points, num_centres: int = 11, *, coverage: float = 0.98):
    """Centres on a regular grid spread over the visited state range, one shared width.

    Args:
        points: either a range ``(low, high)`` (one state dimension), or state samples
            ``(..., state_dim)``, e.g. the smoothed means of an LDS fit: then each
            coordinate's grid spans the central ``coverage`` fraction of the samples
            (quantiles, so outliers do not stretch it), as Ghahramani & Roweis place
            their RBFs "from the density of points in x-space". A coordinate without
            spread (a state the fit left unused, e.g. under MAP-EM's shrinkage) gets
            the widest coordinate's range, centred on its value.
        num_centres: grid points per state coordinate (``num_centres ** state_dim``
            centres in all).

    Returns:
        ``(centres, widths)``: ``(I, state_dim)`` and ``(I,)``; the width (a standard
        deviation) equals the largest grid spacing.
    """
    if not isinstance(num_centres, int) or num_centres < 1:
        raise ValueError(f"num_centres must be a positive int; got {num_centres!r}")
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.shape == (2,):
        lows, highs = arr[:1], arr[1:]
    elif arr.ndim >= 2:
        flat = arr.reshape(-1, arr.shape[-1])
        flat = flat[np.all(np.isfinite(flat), -1)]
        if flat.shape[0] < 2:
            raise ValueError("points must hold at least two finite state samples")
        q = (1.0 - coverage) / 2.0
        lows, highs = np.quantile(flat, q, axis=0), np.quantile(flat, 1.0 - q, axis=0)
        flat_dims = ~(highs > lows)
        if flat_dims.any() and not flat_dims.all():
            half = 0.5 * np.max(highs - lows)
            mid = 0.5 * (lows + highs)
            lows = np.where(flat_dims, mid - half, lows)
            highs = np.where(flat_dims, mid + half, highs)
    else:
        raise ValueError(
            "points must be a range (low, high) or state samples (..., state_dim); "
            f"got shape {arr.shape}"
        )
    if not np.all(highs > lows):
        raise ValueError(f"the state range is empty: low {lows}, high {highs}")
    axes = [np.linspace(lo, hi, num_centres) for lo, hi in zip(lows, highs, strict=True)]
    centres = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], -1)
    spacing = np.max((highs - lows) / max(num_centres - 1, 1))
    return jnp.asarray(centres), jnp.full((centres.shape[0],), spacing)


def rbf(
    y=None,
    *,
    u=None,
    num_steps=None,
    num_sequences=None,
    state_dim: int,
    obs_dim=None,
    centres,
    widths,
    bias: bool = True,
    dynamics_noise: str = "full",
    emission_noise: str = "full",
    init_noise: str = "full",
):
    r"""RBF-network dynamics with a linear read-out.

    .. math::
        x_t \sim \mathcal N\Big(\sum_i h_i \rho_i(x_{t-1}) + A_x x_{t-1} + B u_t + b, Q\Big),
        \quad y_t \sim \mathcal N(C x_t + D u_t + d, R)

    Site ``A`` has shape ``(state_dim, I + state_dim)``: its first ``I`` columns are the
    RBF weights ``h_i``, the rest the linear part ``A_x``. ``centres``: ``(I, state_dim)``,
    ``widths``: ``(I,)`` (standard deviations). Centres and widths are fixed (not sites).
    """
    centres = jnp.asarray(centres)
    widths = jnp.asarray(widths)
    if centres.ndim != 2 or centres.shape[1] != state_dim:
        raise ValueError(
            f"centres must have shape (num_centres, {state_dim}); got {tuple(centres.shape)}"
        )
    if widths.shape != (centres.shape[0],):
        raise ValueError(f"widths must have shape ({centres.shape[0]},); got {tuple(widths.shape)}")

    def phi(x):
        return rbf_features(x, centres, widths)

    return linear_in_params_model(
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        state_dim=state_dim,
        obs_dim=obs_dim,
        dynamics_feature="rbf",
        emission_feature="linear",
        phi=phi,
        psi=lambda x: x,
        num_phi=centres.shape[0] + state_dim,
        num_psi=state_dim,
        bias=bias,
        dynamics_noise=dynamics_noise,
        emission_noise=emission_noise,
        init_noise=init_noise,
        feature_args=(centres, widths),
    )


# its LinearStructure is correct by construction (tests/test_user_models.py verifies it
# for every option): the run-time check of user declarations is skipped
rbf._ppl_dyn_verified_structure = True
