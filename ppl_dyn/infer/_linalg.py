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

SMALL = 8  # products: fused element-wise up to this size
SMALL_FACTOR = 16  # Cholesky and triangular solves: unrolled up to this size

# Besides speed, unrolling avoids *batched* LAPACK calls on CPU: two of them running
# at once can deadlock XLA's intra-op thread pool on a 2-core machine (seen in the EM
# benchmark with a batched Cholesky and a batched LU in the same step).


def _small(*dims: int) -> bool:
    return max(dims) <= SMALL and jax.default_backend() == "cpu"


def _small_factor(d: int) -> bool:
    return d <= SMALL_FACTOR and jax.default_backend() == "cpu"


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


def cholesky(S, in_loop: bool = True):
    """Lower Cholesky factor (unrolled for small sizes). NaN if S is not PD.

    ``in_loop=False``: a factorisation computed once, outside any time loop, of a single
    (unbatched) matrix: the library call, whose program compiles much faster than the
    unrolled one at the same run time (one call). Keep it off batched matrices (see the
    note on batched LAPACK calls above)."""
    d = S.shape[-1]
    if not (in_loop and _small_factor(d)):
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


def _broadcast(L, B, vec):
    batch = jnp.broadcast_shapes(L.shape[:-2], B.shape[: B.ndim - (1 if vec else 2)])
    Bt = jnp.broadcast_to(B, batch + B.shape[B.ndim - (1 if vec else 2) :])
    return jnp.broadcast_to(L, batch + L.shape[-2:]), Bt


def solve_lower(L, B, in_loop: bool = True):
    """Solve ``L X = B`` for lower-triangular ``L``; ``B`` is ``(..., d)`` (when
    ``B.ndim == L.ndim - 1``) or ``(..., d, k)``; batch dimensions broadcast.
    ``in_loop=False``: the library call, as in :func:`cholesky`."""
    d = L.shape[-1]
    vec = B.ndim == L.ndim - 1
    if not (in_loop and _small_factor(d)):
        return solve_triangular(*_broadcast(L, B, vec), lower=True)
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
    if not _small_factor(d):
        return solve_triangular(*_broadcast(L, B, vec), lower=True, trans="T")
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
