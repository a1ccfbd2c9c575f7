r"""LSTM weights that reproduce a linear dynamical system (seed 003's construction).

The LDS (seed convention, zero initial state)

.. math::
    x_{t+1} = A x_t + B u_t,\qquad y_t = C x_t + D u_t,\qquad x_1 = 0

is reproduced by an LSTM layer followed by a linear read-out ``y_t = F h_t`` by
saturating the gates and working in the small-signal regime of ``tanh``:

* input and output gates open (``b_i = b_o = +beta``, their weights zero), so
  ``sigma(.) = 1 - O(e^{-beta})``;
* forget gate closed (``b_f = -beta``), so the cell keeps no memory: ``c_t = g_t``;
* the cell candidate carries the linear dynamics on inputs scaled down by ``s``:
  ``z^g_t = U_g h_{t-1} + W_g u_t`` with ``U_g = blkdiag(A, 0)``, ``W_g = s [B; I]``.

With ``tanh(z) = z - z^3/3 + ...`` the hidden state is
``h_t = tanh(tanh(z^g_t)) = z^g_t - (2/3) (z^g_t)^3 + O(z^5)``, so
``h_t = s [x_{t+1}; u_t] + O(s^3)``. The read-out ``F = [C A^{-1},\ D - C A^{-1} B] / s``
then gives ``F h_t = C A^{-1}(A x_t + B u_t) + (D - C A^{-1} B) u_t + O(s^2)
= C x_t + D u_t + O(s^2)``.

**Error scaling** (derived here, verified in ``tests/test_lstm.py``): the deviation of
``h`` is cubic in its size ``s``, and the read-out divides by ``s``, so the output error is
``O(s^2)`` at fixed input, i.e. *relative* error ``∝ s^2``; at fixed ``s`` and input
amplitude ``a`` (``u -> a u``) the absolute error is ``∝ a^3`` (relative ``∝ a^2``): the
network is linear up to a cubic distortion. Saturated gates add ``O(e^{-beta})``. The
constant grows with the size of the LDS states (the condition is ``s |x_t| << 1``):
``normalize_states=True`` rescales the states first, which matters for companion forms.

``method="delay"`` is a variant we add for singular ``A``: ``2 n + m`` units, a third block
``h_3(t) = s x_t`` copied from ``h_1(t-1)`` (``U_g`` row block ``[I, 0, 0]``), and
``F = [0, D, C] / s`` (no inverse of ``A``; the copy passes through ``tanh`` twice more, so
the error constant differs but the ``s^2`` law is the same).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn.models.lstm import lstm_cell

__all__ = ["LSTMWeights", "lstm_from_lds", "lstm_output", "lds_output"]


class LSTMWeights(NamedTuple):
    """Weights of one LSTM layer plus a linear read-out ``y_t = C h_t + d``.

    Names match the sites of :func:`ppl_dyn.models.lstm.lstm` (``W`` input weights
    ``(4H, m)``, ``U`` recurrent ``(4H, H)``, ``b`` biases ``(4H,)``, gate order
    ``i, f, g, o``; ``C`` ``(p, H)`` is the seed's ``F``).
    """

    W: np.ndarray
    U: np.ndarray
    b: np.ndarray
    C: np.ndarray
    d: np.ndarray

    def as_params(self) -> dict:
        """The weights as a parameter dict for :func:`ppl_dyn.models.lstm.lstm`."""
        return {k: jnp.asarray(v) for k, v in self._asdict().items()}


def _matrices(A, B, C, D):
    A, B, C = (np.atleast_2d(np.asarray(M, dtype=float)) for M in (A, B, C))
    n = A.shape[0]
    if A.shape != (n, n):
        raise ValueError(f"A must be square (n, n); got shape {A.shape}")
    if B.shape[0] != n:
        raise ValueError(f"B must have shape ({n}, input_dim); got shape {B.shape}")
    if C.shape[1] != n:
        raise ValueError(f"C must have shape (output_dim, {n}); got shape {C.shape}")
    m, p = B.shape[1], C.shape[0]
    D = np.zeros((p, m)) if D is None else np.atleast_2d(np.asarray(D, dtype=float))
    if D.shape != (p, m):
        raise ValueError(f"D must have shape ({p}, {m}); got shape {D.shape}")
    return A, B, C, D


def lstm_from_lds(
    A,
    B,
    C,
    D=None,
    *,
    input_scale: float = 1e-3,
    gate_bias: float = 100.0,
    method: str = "seed",
    normalize_states: bool = False,
) -> LSTMWeights:
    """LSTM weights whose deterministic output approximates the LDS output.

    Args:
        A, B, C, D: the LDS ``x_{t+1} = A x_t + B u_t``, ``y_t = C x_t + D u_t``
            (``D`` defaults to zero).
        input_scale: ``s``: the inputs are scaled down by ``s`` inside the layer (so
            ``tanh`` acts linearly) and the read-out scales up by ``1/s``. The output error
            is ``O(s^2)``.
        gate_bias: ``beta``: saturation of the open (``+beta``) and closed (``-beta``)
            gates; adds an error ``O(e^{-beta})``.
        method: ``"seed"`` (``n + m`` units; needs ``A`` invertible) or ``"delay"``
            (``2 n + m`` units; any ``A``).
        normalize_states: first change the LDS's state coordinates (a diagonal
            similarity, which leaves the input-output map unchanged) so that every state
            has unit variance under white unit-variance input (unit diagonal of the
            controllability Gramian). The small-signal condition is ``s |x_t| << 1``, so
            a realization with large states (e.g. a companion form) needs a much smaller
            ``s``; normalising removes that dependence. Needs ``A`` stable.

    Returns:
        :class:`LSTMWeights` with ``H = n + m`` (or ``2 n + m``) units.

    Example:
        >>> import numpy as np
        >>> from ppl_dyn.lstm_lds import lds_output, lstm_from_lds, lstm_output
        >>> A, B, C = np.array([[0.9]]), np.array([[1.0]]), np.array([[1.0]])
        >>> u = np.random.default_rng(0).normal(size=(30, 1))
        >>> w = lstm_from_lds(A, B, C, input_scale=1e-3)
        >>> bool(np.max(np.abs(lstm_output(w, u) - lds_output(A, B, C, None, u))) < 1e-4)
        True
    """
    A, B, C, D = _matrices(A, B, C, D)
    s, beta = float(input_scale), float(gate_bias)
    if not s > 0:
        raise ValueError(f"input_scale must be positive; got {input_scale!r}")
    if not beta > 0:
        raise ValueError(f"gate_bias must be positive; got {gate_bias!r}")
    n, m, p = A.shape[0], B.shape[1], C.shape[0]
    if normalize_states:
        A, B, C = _normalize_states(A, B, C)
    if method == "seed":
        if np.linalg.matrix_rank(A) < n:
            raise ValueError("A is singular: method='seed' needs A invertible; use method='delay'")
        H = n + m
        Ug = np.zeros((H, H))
        Ug[:n, :n] = A
        Wg = s * np.vstack([B, np.eye(m)])
        CAinv = np.linalg.solve(A.T, C.T).T  # C A^{-1}
        F = np.hstack([CAinv, D - CAinv @ B]) / s
    elif method == "delay":
        H = 2 * n + m
        Ug = np.zeros((H, H))
        Ug[:n, :n] = A
        Ug[n + m :, :n] = np.eye(n)  # h_3(t) = s x_t copied from h_1(t-1) = s x_t
        Wg = s * np.vstack([B, np.eye(m), np.zeros((n, m))])
        F = np.hstack([np.zeros((p, n)), D, C]) / s
    else:
        raise ValueError(f"method must be 'seed' or 'delay'; got {method!r}")
    zeros_w, zeros_u = np.zeros((H, m)), np.zeros((H, H))
    W = np.vstack([zeros_w, zeros_w, Wg, zeros_w])
    U = np.vstack([zeros_u, zeros_u, Ug, zeros_u])
    b = np.concatenate([beta * np.ones(H), -beta * np.ones(H), np.zeros(H), beta * np.ones(H)])
    return LSTMWeights(W=W, U=U, b=b, C=F, d=np.zeros(p))


def _normalize_states(A, B, C):
    """Diagonal similarity giving unit controllability-Gramian diagonal."""
    n = A.shape[0]
    if np.max(np.abs(np.linalg.eigvals(A))) >= 1.0:
        raise ValueError("normalize_states needs a stable A (spectral radius < 1)")
    # W = A W A^T + B B^T  <=>  (I - A kron A) vec(W) = vec(B B^T)
    Wc = np.linalg.solve(np.eye(n * n) - np.kron(A, A), (B @ B.T).reshape(-1)).reshape(n, n)
    scale = np.sqrt(np.maximum(np.diag(Wc), 1e-300))
    if np.min(np.diag(Wc)) <= 1e-12 * np.max(np.diag(Wc)):
        raise ValueError("normalize_states: a state is (nearly) uncontrollable")
    return A * scale[None, :] / scale[:, None], B / scale[:, None], C * scale[None, :]


def lstm_output(weights: LSTMWeights, u, c0=None, h0=None) -> np.ndarray:
    """Deterministic output ``y_t = C h_t + d`` of the LSTM layer driven by ``u``
    ``(T, m)`` from ``(c_0, h_0)`` (zeros by default); returns ``(T, p)``."""
    W, U, b, C, d = (jnp.asarray(a) for a in weights)
    u = jnp.asarray(u, dtype=W.dtype)
    if u.ndim != 2 or u.shape[1] != W.shape[1]:
        raise ValueError(f"u must have shape (T, {W.shape[1]}); got shape {tuple(u.shape)}")
    H = U.shape[1]
    c = jnp.zeros(H, W.dtype) if c0 is None else jnp.asarray(c0, W.dtype)
    h = jnp.zeros(H, W.dtype) if h0 is None else jnp.asarray(h0, W.dtype)
    return np.asarray(_run_lstm(W, U, b, C, d, c, h, u))


@jax.jit
def _run_lstm(W, U, b, C, d, c, h, u):
    def step(carry, u_t):
        c, h = lstm_cell(W, U, b, *carry, u_t)
        return (c, h), h

    _, hs = jax.lax.scan(step, (c, h), u)
    return hs @ C.T + d


def lds_output(A, B, C, D, u, x0=None) -> np.ndarray:
    """Output ``y_t = C x_t + D u_t`` of ``x_{t+1} = A x_t + B u_t`` (``x_1 = x0``,
    zero by default) for inputs ``u`` ``(T, m)``; returns ``(T, p)``."""
    A, B, C, D = _matrices(A, B, C, D)
    u = np.asarray(u, dtype=float)
    if u.ndim != 2 or u.shape[1] != B.shape[1]:
        raise ValueError(f"u must have shape (T, {B.shape[1]}); got shape {u.shape}")
    x = np.zeros(A.shape[0]) if x0 is None else np.asarray(x0, dtype=float)
    out = np.empty((u.shape[0], C.shape[0]))
    for t, u_t in enumerate(u):
        out[t] = C @ x + D @ u_t
        x = A @ x + B @ u_t
    return out
