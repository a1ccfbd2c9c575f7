"""Noisy tanh recurrent network (Unkelbach, Yi & Schmidhuber) as a state-space model."""

from __future__ import annotations

import jax.numpy as jnp

from ppl_dyn.models._linear_family import linear_in_params_model


def _identity(x):
    return x


def tanh_rnn(
    y=None,
    *,
    u=None,
    num_steps=None,
    num_sequences=None,
    state_dim: int,
    obs_dim=None,
    bias: bool = True,
    emission_feature: str = "tanh",
    dynamics_noise: str = "full",
    emission_noise: str = "full",
    init_noise: str = "full",
):
    r"""Noisy tanh-RNN.

    .. math::
        x_1 \sim \mathcal N(m_0, P_0),\quad
        x_t \sim \mathcal N(A \tanh(x_{t-1}) + B u_t + b, Q),\quad
        y_t \sim \mathcal N(C \tanh(x_t) + D u_t + d, R)

    The seed's (A, B, Gamma, Sigma) are our (A, C, Q, R). ``emission_feature="linear"``
    gives a linear read-out ``C x_t`` instead. Other arguments as in :func:`lds`.
    """
    if emission_feature not in ("tanh", "linear"):
        raise ValueError(f"emission_feature must be 'tanh' or 'linear'; got {emission_feature!r}")
    return linear_in_params_model(
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        state_dim=state_dim,
        obs_dim=obs_dim,
        dynamics_feature="tanh",
        emission_feature=emission_feature,
        phi=jnp.tanh,
        psi=jnp.tanh if emission_feature == "tanh" else _identity,
        num_phi=state_dim,
        num_psi=state_dim,
        bias=bias,
        dynamics_noise=dynamics_noise,
        emission_noise=emission_noise,
        init_noise=init_noise,
    )


# its LinearStructure is correct by construction (tests/test_user_models.py verifies it
# for every option): the run-time check of user declarations is skipped
tanh_rnn._ppl_dyn_verified_structure = True
