"""Linear dynamical system (linear-Gaussian state-space model)."""

from __future__ import annotations

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
    )
