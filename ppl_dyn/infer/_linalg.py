"""Small dense linear algebra that XLA can fuse.

Inside a ``lax.scan`` over time each ``dot`` or LAPACK call (Cholesky, triangular
solve) is a separate kernel with a fixed dispatch cost on CPU that dwarfs the arithmetic
for state dimensions of a few units. For small static sizes we therefore write products,
Cholesky factors and triangular solves with element-wise operations and reductions,
which XLA fuses into a handful of kernels per step (measured: ~10x faster per step for
d = 2 on CPU). Above ``SMALL`` (or on accelerators) the library calls are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

SMALL = 8


def _small(*dims: int) -> bool:
    return max(dims) <= SMALL and jax.default_backend() == "cpu"


def mm(a, b):
    """Matrix product of the last two axes."""
    if _small(a.shape[-2], a.shape[-1], b.shape[-1]):
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    return a @ b


def mv(a, v):
    """Matrix-vector product."""
    if _small(*a.shape[-2:]):
        return jnp.sum(a * v[..., None, :], axis=-1)
    return a @ v


def sym(P):
    return 0.5 * (P + jnp.swapaxes(P, -1, -2))


def cholesky(S):
    """Lower Cholesky factor (unrolled for small sizes). NaN if S is not PD."""
    d = S.shape[-1]
    if not _small(d):
        return jnp.linalg.cholesky(S)
    cols = []
    for j in range(d):
        prev = [c for c in cols]  # columns 0..j-1, each (d,)
        s = S[..., :, j]
        for c in prev:
            s = s - c * c[..., j : j + 1]
        ljj = jnp.sqrt(s[..., j : j + 1])
        col = jnp.where(jnp.arange(d) >= j, s / ljj, 0.0)
        cols.append(col)
    return jnp.stack(cols, axis=-1)


def solve_lower(L, B):
    """Solve ``L X = B`` for lower-triangular ``L``; ``B`` is ``(d,)`` or ``(d, k)``."""
    d = L.shape[-1]
    vec = B.ndim == L.ndim - 1
    if not _small(d):
        return solve_triangular(L, B, lower=True)
    Bm = B[..., None] if vec else B
    rows = []
    for i in range(d):
        acc = Bm[..., i, :]
        for j, xj in enumerate(rows):
            acc = acc - L[..., i, j : j + 1] * xj
        rows.append(acc / L[..., i, i : i + 1])
    X = jnp.stack(rows, axis=-2)
    return X[..., 0] if vec else X


def solve_upper_t(L, B):
    """Solve ``L^T X = B`` for lower-triangular ``L``."""
    d = L.shape[-1]
    vec = B.ndim == L.ndim - 1
    if not _small(d):
        return solve_triangular(L, B, lower=True, trans="T")
    Bm = B[..., None] if vec else B
    rows: list = [None] * d
    for i in reversed(range(d)):
        acc = Bm[..., i, :]
        for j in range(i + 1, d):
            acc = acc - L[..., j, i : i + 1] * rows[j]
        rows[i] = acc / L[..., i, i : i + 1]
    X = jnp.stack(rows, axis=-2)
    return X[..., 0] if vec else X


def cho_solve(L, B):
    """Solve ``(L L^T) X = B``."""
    return solve_upper_t(L, solve_lower(L, B))


def log_det_from_cholesky(L):
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
