"""Eager input checks at the public API boundary (before any tracing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints


def check_rng_key(rng_key) -> None:
    if rng_key is None:
        raise ValueError("rng_key is required (e.g. jax.random.key(0)); there is no default")


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def device_array(value, dtype=None) -> jax.Array:
    """``jnp.asarray(value, dtype)`` without compiling anything for host (NumPy) data.

    Eagerly, ``jnp.asarray`` of a NumPy array stages it through a small compiled
    identity program, one XLA compilation per shape and dtype: about 9 ms each in a
    fresh process (JAX 0.10). ``jax.device_put`` only copies, with the same dtype
    canonicalisation (float64 becomes float32 without x64). Anything other than a NumPy
    array or scalar (tracers, JAX arrays, lists) goes through ``jnp.asarray``."""
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype != object:
        return jax.device_put(value if dtype is None else np.asarray(value, dtype))
    return jnp.asarray(value, dtype)


def check_observations(y, name: str = "y") -> None:
    """NaN is missing data; +-inf is an error naming the first offending index."""
    if y is None or not is_concrete(y):
        return
    arr = np.asarray(np.ma.filled(y, np.nan) if isinstance(y, np.ma.MaskedArray) else y)
    if not np.issubdtype(arr.dtype, np.floating):
        if np.issubdtype(arr.dtype, np.number):
            return
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
    bad = np.isinf(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} contains {arr[idx]} at index {idx}; use NaN for missing values")
    # squares (variances, Kalman gains) must stay finite in the data's precision
    limit = float(np.sqrt(np.finfo(arr.dtype).max)) * 1e-4
    with np.errstate(invalid="ignore"):
        huge = np.abs(arr) > limit
    if huge.any():
        idx = tuple(int(i) for i in np.argwhere(huge)[0])
        raise ValueError(
            f"{name} contains {arr[idx]:.3g} at index {idx}: too large to square in "
            f"{arr.dtype} (|{name}| must stay below {limit:.1g}); rescale the data"
        )


def check_some_observed(y, name: str = "y") -> None:
    """A fit needs data: ``ValueError`` when every entry of ``y`` is missing (NaN)."""
    if y is None or not is_concrete(y):
        return
    arr = np.asarray(y)
    if np.issubdtype(arr.dtype, np.floating) and arr.size and np.isnan(arr).all():
        raise ValueError(f"{name} has no observed entry (every value is NaN): nothing to fit")


def check_inputs(u, name: str = "u") -> None:
    if u is None or not is_concrete(u):
        return
    arr = np.asarray(u)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite; got {arr[idx]} at index {idx}")


def check_params(params: dict, free_sites: dict, require_all: bool = True) -> None:
    """Shapes, finiteness and support of parameter values (eager API only).

    ``free_sites`` maps site names to trace sites (from :func:`inspect_model`).
    """
    unknown = set(params) - set(free_sites)
    for name, site in free_sites.items():
        if name not in params:
            if not require_all:
                continue
            raise ValueError(f"params lacks a value for the parameter site {name!r}")
        value = params[name]
        if not is_concrete(value):
            continue
        v = np.asarray(value)
        fn = site["fn"]
        expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
        if v.shape != expected:
            raise ValueError(
                f"got invalid {name} parameter: expected shape {expected}, got {v.shape}"
            )
        if not np.all(np.isfinite(v)):
            raise ValueError(f"got invalid {name} parameter: it contains NaN or inf")
        support = fn.support
        if support is constraints.positive_definite or isinstance(
            support, type(constraints.positive_definite)
        ):
            check_covariance(v, name)
        elif not _in_support(support, v):
            raise ValueError(f"got invalid {name} parameter: outside its support {support}")
    del unknown  # extra keys (e.g. frozen sites) are ignored by bind()


def _in_support(support, v: np.ndarray) -> bool:
    # most constraints evaluate on NumPy arrays directly (no eager XLA compilation)
    try:
        return bool(np.all(np.asarray(support(v))))
    except Exception:
        return bool(np.all(np.asarray(support(jnp.asarray(v)))))


def check_covariance(v: np.ndarray, name: str) -> None:
    scale = max(float(np.max(np.abs(v))), np.finfo(v.dtype).tiny)
    tol = 1e-6 if v.dtype == np.float32 else 1e-10
    asym = float(np.max(np.abs(v - np.swapaxes(v, -1, -2))))
    if asym > tol * scale:
        raise ValueError(
            f"got invalid {name} parameter: not symmetric (max |{name} - {name}^T| = {asym:.3g})"
        )
    lam = float(np.min(np.linalg.eigvalsh(0.5 * (v + np.swapaxes(v, -1, -2)))))
    if lam <= 0:
        raise ValueError(
            f"got invalid {name} parameter: not positive definite (lambda_min = {lam:.3g})"
        )
