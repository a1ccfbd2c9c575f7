"""A stochastic LSTM as a state-space model (seed 003: the LSTM as a dynamical system).

The latent state is the pair (cell ``c``, hidden ``h``) of an LSTM layer with ``H`` units,
concatenated as ``x = [c; h]`` (``state_dim = 2 H``). One step of the layer is the mean of
the transition; Gaussian process noise makes it stochastic, like the noisy tanh-RNN:

.. math::
    z_t &= W u_t + U h_{t-1} + b \\in \\mathbb R^{4H},\\quad
    (z^i, z^f, z^g, z^o) = z_t \\text{ (gate order of the seed)},\\\\
    \\bar c_t &= \\sigma(z^f) \\odot c_{t-1} + \\sigma(z^i) \\odot \\tanh(z^g),\\qquad
    \\bar h_t = \\sigma(z^o) \\odot \\tanh(\\bar c_t),\\\\
    [c_t; h_t] &\\sim \\mathcal N([\\bar c_t; \\bar h_t],\\ Q),\\qquad
    y_t \\sim \\mathcal N(C h_t + d,\\ R),\\qquad [c_1; h_1] \\sim \\mathcal N(m_0, P_0).

The transition is driven by the exogenous inputs ``u`` only, never by the previous
observation: the state carries all memory, so ``ppl_dyn.predict``'s rollouts and the
particle smoother see an ordinary Markov model. (Feeding ``y_{t-1}`` back as an input
would make the model autoregressive; pass lagged observations as ``u`` if you want that,
knowing that k-step forecasts then need the future inputs.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_dyn.models._linear_family import _cov_site, _gaussian
from ppl_dyn.state_space import markov, normalise_data

__all__ = ["lstm", "lstm_cell", "lstm_gates"]


def lstm_gates(z: jax.Array):
    """Split gate pre-activations ``(..., 4H)`` into activated ``(i, f, g, o)``."""
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)


def lstm_cell(W, U, b, c, h, v):
    """One deterministic LSTM step, broadcasting over leading batch dimensions.

    Args:
        W: input weights ``(4H, dv)`` (``dv`` may be 0) or None (no inputs).
        U: recurrent weights ``(4H, H)``.
        b: gate biases ``(4H,)`` or None.
        c, h: previous cell and hidden state ``(..., H)``.
        v: input ``(..., dv)`` (ignored when ``W`` is None).

    Returns:
        ``(c_new, h_new)``, each ``(..., H)``.
    """
    z = h @ U.T
    if W is not None and W.shape[-1] > 0:
        z = z + v @ W.T
    if b is not None:
        z = z + b
    i, f, g, o = lstm_gates(z)
    c_new = f * c + i * g
    return c_new, o * jnp.tanh(c_new)


def lstm(
    y=None,
    u=None,
    *,
    num_steps=None,
    num_sequences=None,
    state_dim: int,
    obs_dim=None,
    bias: bool = True,
    dynamics_noise: str = "diag",
    emission_noise: str = "diag",
    init_noise: str = "diag",
):
    r"""Stochastic LSTM state-space model (latent ``[c; h]`` of dimension ``2 * state_dim``).

    .. math::
        [c_t; h_t] \sim \mathcal N(\mathrm{LSTM}(c_{t-1}, h_{t-1}, u_t), Q),\quad
        y_t \sim \mathcal N(C h_t + d, R)

    Args:
        y: observations ``(T, obs_dim)`` or ``(S, T, obs_dim)``; NaN = missing.
        u: inputs ``(T, input_dim)`` or ``(S, T, input_dim)`` driving the cell.
        num_steps, num_sequences, obs_dim: needed only when ``y`` is None.
        state_dim: number of LSTM units ``H`` (the latent state has ``2 H`` entries:
            cell then hidden).
        bias: include the gate biases ``b`` and the emission offset ``d``.
        dynamics_noise, emission_noise, init_noise: ``"diag"`` (a vector of variances)
            or ``"full"`` (a covariance matrix) for ``Q``, ``R``, ``P0``.

    Sites (gate order ``i, f, g, o`` as in seed 003): ``W`` ``(4H, du)`` (only with
    inputs), ``U`` ``(4H, H)``, ``b`` ``(4H,)``, ``C`` ``(dy, H)``, ``d`` ``(dy,)``,
    ``Q``, ``R``, ``m0`` ``(2H,)``, ``P0``. Priors: ``W ~ N(0, 1/sqrt(du))``,
    ``U ~ N(0, 1/sqrt(H))``, ``b, C, d ~ N(0, 1)``, ``m0 ~ N(0, 0.5)``; ``Q`` has prior
    mean ``0.01 I`` (the hidden state lives in ``(-1, 1)``), ``R`` ``0.1 I``, ``P0``
    ``0.1 I`` (inverse-gamma, or inverse-Wishart for ``"full"``).

    There is no closed-form M-step: fit it with
    ``EM(lstm, ParticleSmoother(mode="ffbsi"), GradientMStep())``.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models.lstm import lstm
        >>> out = ppl_dyn.simulate(jax.random.key(0), lstm, num_steps=20, state_dim=2,
        ...                        obs_dim=1)
        >>> out["x"].shape, out["y"].shape
        ((20, 4), (20, 1))
    """
    if isinstance(state_dim, bool) or not isinstance(state_dim, (int, np.integer)) or state_dim < 1:
        raise ValueError(
            f"state_dim must be a positive int (number of LSTM units); got {state_dim!r}"
        )
    _, un, _, _, _, dy = normalise_data(y, u, num_steps, num_sequences, obs_dim)
    du = un.shape[-1]
    H = int(state_dim)

    W = None
    if du > 0:
        W = numpyro.sample("W", dist.Normal(0.0, 1.0 / np.sqrt(du)).expand([4 * H, du]).to_event(2))
    U = numpyro.sample("U", dist.Normal(0.0, 1.0 / np.sqrt(H)).expand([4 * H, H]).to_event(2))
    C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([dy, H]).to_event(2))
    b = d = None
    if bias:
        b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([4 * H]).to_event(1))
        d = numpyro.sample("d", dist.Normal(0.0, 1.0).expand([dy]).to_event(1))
    Q = _cov_site("Q", 2 * H, dynamics_noise, 0.01)
    R = _cov_site("R", dy, emission_noise, 0.1)
    m0 = numpyro.sample("m0", dist.Normal(0.0, 0.5).expand([2 * H]).to_event(1))
    P0 = _cov_site("P0", 2 * H, init_noise, 0.1)

    def transition(x_prev, u_t):
        c_new, h_new = lstm_cell(W, U, b, x_prev[..., :H], x_prev[..., H:], u_t)
        return _gaussian(jnp.concatenate([c_new, h_new], -1), Q, dynamics_noise)

    def emission(x, u_t):
        mean = x[..., H:] @ C.T
        if d is not None:
            mean = mean + d
        return _gaussian(mean, R, emission_noise)

    return markov(
        _gaussian(m0, P0, init_noise),
        transition,
        emission,
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=obs_dim,
    )
