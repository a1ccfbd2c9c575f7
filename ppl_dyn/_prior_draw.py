"""Exact prior draws in NumPy for the distributions our priors use.

Eager JAX sampling compiles every sampler the first time it meets a shape; NumPyro's
``InverseWishart`` (Bartlett decomposition over ``random.gamma``, a rejection loop) costs
seconds of XLA compilation in a fresh process, which made ``EM.init`` slower than the
EM iterations it starts. Initial values need a draw from the prior, not JAX's random
stream, so :func:`numpy_draw` samples the common prior families with NumPy's generator
(exactly in distribution) and returns ``None`` for anything else, which the caller then
samples with NumPyro as before.

Supported: ``Normal``, ``Gamma``, ``InverseGamma``, ``Exponential``, ``HalfNormal``,
``LogNormal``, ``Uniform``, ``InverseWishart`` (any real ``concentration > dim - 1``, by the
Bartlett decomposition), wrapped in ``Independent`` or expanded from a scalar batch.
Parameters must be concrete (not tracers).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.distribution import ExpandedDistribution


def generator_from_key(rng_key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX PRNG key (new-style or raw uint32)."""
    if jax.dtypes.issubdtype(getattr(rng_key, "dtype", None), jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    return np.random.default_rng(np.asarray(rng_key, dtype=np.uint32).ravel().tolist())


def _concrete(*arrays) -> Optional[list]:
    out = []
    for a in arrays:
        if isinstance(a, jax.core.Tracer):
            return None
        out.append(np.asarray(a, dtype=float))
    return out


def _inverse_wishart(rng, nu, L, shape):
    """``X = L (A A^T)^{-1} L^T`` with ``A`` the Bartlett factor of ``Wishart(nu, I)``:
    if ``W ~ Wishart(nu, I)`` then ``L W^{-1} L^T ~ InverseWishart(nu, L L^T)``."""
    p = L.shape[-1]
    nu = np.broadcast_to(nu, shape)
    L = np.broadcast_to(L, shape + (p, p))
    A = np.tril(rng.standard_normal(shape + (p, p)), -1)
    chi = rng.chisquare(nu[..., None] - np.arange(p), size=shape + (p,))
    A[..., np.arange(p), np.arange(p)] = np.sqrt(chi)
    # L (A A^T)^{-1} L^T = (L A^{-T})(L A^{-T})^T
    M = np.swapaxes(np.linalg.solve(A, np.swapaxes(L, -1, -2)), -1, -2)
    X = M @ np.swapaxes(M, -1, -2)
    return 0.5 * (X + np.swapaxes(X, -1, -2))


def _draw(fn, rng, sample_shape: tuple):
    if isinstance(fn, dist.Independent):
        return _draw(fn.base_dist, rng, sample_shape)
    if isinstance(fn, ExpandedDistribution):
        base = fn.base_dist
        if base.batch_shape != ():
            return None
        return _draw(base, rng, sample_shape + tuple(fn.batch_shape))
    shape = sample_shape + tuple(fn.batch_shape)
    if type(fn) is dist.Normal:
        p = _concrete(fn.loc, fn.scale)
        return None if p is None else p[0] + p[1] * rng.standard_normal(shape)
    if type(fn) is dist.LogNormal:
        p = _concrete(fn.loc, fn.scale)
        return None if p is None else np.exp(p[0] + p[1] * rng.standard_normal(shape))
    if type(fn) is dist.HalfNormal:
        p = _concrete(fn.scale)
        return None if p is None else np.abs(p[0] * rng.standard_normal(shape))
    if type(fn) is dist.Gamma:
        p = _concrete(fn.concentration, fn.rate)
        return None if p is None else rng.gamma(np.broadcast_to(p[0], shape)) / p[1]
    if type(fn) is dist.InverseGamma:
        p = _concrete(fn.concentration, fn.rate)
        return None if p is None else p[1] / rng.gamma(np.broadcast_to(p[0], shape))
    if type(fn) is dist.Exponential:
        p = _concrete(fn.rate)
        return None if p is None else rng.standard_exponential(shape) / p[0]
    if type(fn) is dist.Uniform:
        p = _concrete(fn.low, fn.high)
        return None if p is None else p[0] + (p[1] - p[0]) * rng.uniform(size=shape)
    if type(fn) is dist.InverseWishart:
        base = fn.base_dist  # InverseWishartCholesky: concentration, scale_tril
        p = _concrete(base.concentration, base.scale_tril)
        if p is None or np.any(p[0] <= p[1].shape[-1] - 1):
            return None
        return _inverse_wishart(rng, p[0], p[1], shape)
    return None


def numpy_draw(fn, rng: np.random.Generator, sample_shape: tuple = ()) -> Optional[np.ndarray]:
    """One exact draw of ``fn`` (shape ``sample_shape + fn.shape()``) with NumPy, in the
    distribution's dtype convention (float64; the caller casts), or ``None`` when ``fn``
    is not a supported family or has traced parameters."""
    value = _draw(fn, rng, tuple(sample_shape))
    if value is None:
        return None
    value = np.asarray(value, dtype=float)
    want = tuple(sample_shape) + tuple(fn.batch_shape) + tuple(fn.event_shape)
    return value if value.shape == want else None
