"""Shared construction of the built-in models (LDS, tanh-RNN, RBF network).

All three share one site-role contract (control notation):

.. math::
    x_1 \\sim \\mathcal N(m_0, P_0),\\qquad
    x_t \\sim \\mathcal N(A\\,\\varphi(x_{t-1}) + B u_t + b,\\; Q),\\qquad
    y_t \\sim \\mathcal N(C\\,\\psi(x_t) + D u_t + d,\\; R)

Priors (weakly informative; documented in ``docs/models.md``):

* ``A ~ Normal(0, 0.5/sqrt(n_features))`` entrywise (circular law: spectral radius
  about 0.5, so prior draws are mostly stable),
* ``B, C, D ~ Normal(0, 1)``, ``b, d, m0 ~ Normal(0, 1)``,
* full covariances ``Q, R ~ InverseWishart(dim + 2, 0.1 I)`` (mean ``0.1 I``),
  ``P0 ~ InverseWishart(dx + 2, I)`` (mean ``I``),
* diagonal covariances (a vector of variances) ``InverseGamma(2, 0.1)`` (``P0``:
  ``InverseGamma(2, 1)``).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_dyn.state_space import LinearStructure, Regression, markov, normalise_data

_NOISE = ("full", "diag")


def _cov_site(name: str, dim: int, structure: str, scale: float):
    if structure not in _NOISE:
        raise ValueError(f"{name} structure must be 'full' or 'diag'; got {structure!r}")
    if structure == "full":
        # NumPy constants and the Cholesky factor given directly: no eager XLA work
        tril = np.sqrt(scale) * np.eye(dim)
        return numpyro.sample(name, dist.InverseWishart(dim + 2.0, scale_tril=tril))
    return numpyro.sample(name, dist.InverseGamma(2.0, scale).expand([dim]).to_event(1))


def _gaussian(mean, cov, structure):
    if structure == "diag":
        return dist.Normal(mean, jnp.sqrt(cov)).to_event(1)
    return dist.MultivariateNormal(mean, covariance_matrix=cov)


def linear_in_params_model(
    *,
    y,
    u,
    num_steps,
    num_sequences,
    state_dim,
    obs_dim,
    dynamics_feature: str,
    emission_feature: str,
    phi: Callable,
    psi: Callable,
    num_phi: int,
    num_psi: int,
    bias: bool,
    dynamics_noise: str,
    emission_noise: str,
    init_noise: str,
    feature_args: tuple = (),
    identified: bool = False,
):
    if not isinstance(state_dim, int) or state_dim < 1:
        raise ValueError(f"state_dim must be a positive int; got {state_dim!r}")
    # validate data shapes early so errors name the argument
    _, un, T, S, batched, dy = normalise_data(y, u, num_steps, num_sequences, obs_dim)
    du = un.shape[-1]
    dx = state_dim

    A = numpyro.sample(
        "A", dist.Normal(0.0, 0.5 / np.sqrt(num_phi)).expand([dx, num_phi]).to_event(2)
    )
    if identified:
        C = _identified_emission(dx, dy, num_psi, dynamics_feature, emission_feature)
    else:
        C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([dy, num_psi]).to_event(2))
    B = D = None
    if du > 0:
        B = numpyro.sample("B", dist.Normal(0.0, 1.0).expand([dx, du]).to_event(2))
        D = numpyro.sample("D", dist.Normal(0.0, 1.0).expand([dy, du]).to_event(2))
    b = d = None
    if bias:
        # identified: the state's origin is fixed by b = 0 (a shift of the state moves
        # the offset between b and d; d keeps the data's level)
        if not identified:
            b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([dx]).to_event(1))
        d = numpyro.sample("d", dist.Normal(0.0, 1.0).expand([dy]).to_event(1))
    if identified:  # the state's scale and rotation are fixed by Q = I (see lds)
        dynamics_noise = "full"
        Q = numpyro.deterministic("Q", jnp.eye(dx))
    else:
        Q = _cov_site("Q", dx, dynamics_noise, 0.1)
    R = _cov_site("R", dy, emission_noise, 0.1)
    m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([dx]).to_event(1))
    P0 = _cov_site("P0", dx, init_noise, 1.0)

    def affine(W, feats, V, c, uu):
        out = feats @ W.T
        if V is not None:
            out = out + uu @ V.T
        if c is not None:
            out = out + c
        return out

    def transition(x_prev, u_t):
        return _gaussian(affine(A, phi(x_prev), B, b, u_t), Q, dynamics_noise)

    def emission(x, u_t):
        return _gaussian(affine(C, psi(x), D, d, u_t), R, emission_noise)

    structure = LinearStructure(
        dynamics=Regression(
            weight="A",
            noise="Q",
            feature=dynamics_feature,
            input_weight="B" if du > 0 else None,
            bias="b" if bias else None,
            diagonal_noise=dynamics_noise == "diag",
            feature_args=feature_args,
        ),
        emission=Regression(
            weight="C",
            noise="R",
            feature=emission_feature,
            input_weight="D" if du > 0 else None,
            bias="d" if bias else None,
            diagonal_noise=emission_noise == "diag",
            feature_args=feature_args if emission_feature == "rbf" else (),
        ),
        init_mean="m0",
        init_cov="P0",
        diagonal_init=init_noise == "diag",
    )
    return markov(
        _gaussian(m0, P0, init_noise),
        transition,
        emission,
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=obs_dim,
        structure=None if identified else structure,
    )


def _identified_emission(dx, dy, num_psi, dynamics_feature, emission_feature):
    """``C`` lower-trapezoidal with a positive (log-normal) diagonal, as a deterministic
    site built from ``C_diag`` and ``C_lower`` (the identified LDS)."""
    if (dynamics_feature, emission_feature) != ("linear", "linear"):
        raise ValueError("identified=True is the canonical form of the linear model (lds)")
    if dy < dx:
        raise ValueError(
            f"identified=True needs obs_dim >= state_dim (C lower-trapezoidal with a "
            f"positive diagonal); got obs_dim={dy}, state_dim={dx}"
        )
    rows, cols = np.nonzero(np.tril(np.ones((dy, dx)), -1))
    diag = numpyro.sample("C_diag", dist.LogNormal(0.0, 1.0).expand([dx]).to_event(1))
    lower = numpyro.sample("C_lower", dist.Normal(0.0, 1.0).expand([rows.size]).to_event(1))
    C = jnp.zeros((dy, num_psi), diag.dtype)
    C = C.at[np.arange(dx), np.arange(dx)].set(diag).at[rows, cols].set(lower)
    return numpyro.deterministic("C", C)


def check_optional_dim(name: str, value: Optional[int]):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int; got {value!r}")
