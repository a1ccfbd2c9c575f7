"""The regressor feature maps of the built-in model family, ``phi(x)``.

At the bottom of the package (JAX only): :class:`ppl_dyn.state_space.Regression` names a
feature map by a string and evaluates it here, and the models and E-steps that need the
maps import them from here, so no module below the models imports a model.
"""

from __future__ import annotations

import jax.numpy as jnp


def linear_features(x):
    """``phi(x) = x``."""
    return x


def tanh_features(x):
    """``phi(x) = tanh(x)`` element-wise."""
    return jnp.tanh(x)


def rbf_features(x, centres, widths):
    r"""Features :math:`[\rho_1(x), \dots, \rho_I(x), x]` with
    :math:`\rho_i(x) = \mathcal N(x; c_i, S_i)`, :math:`S_i = w_i^2 I`.

    ``x``: ``(..., dx)``; ``centres``: ``(I, dx)``; ``widths``: ``(I,)`` standard deviations.
    """
    dx = centres.shape[-1]
    s2 = widths**2
    sq = jnp.sum((x[..., None, :] - centres) ** 2, -1)  # (..., I)
    rho = jnp.exp(-0.5 * sq / s2 - 0.5 * dx * jnp.log(2 * jnp.pi * s2))
    return jnp.concatenate([rho, x], -1)


#: The feature maps by name: ``(x, *feature_args) -> phi(x)``.
FEATURES = {"linear": linear_features, "tanh": tanh_features, "rbf": rbf_features}
