"""Trace-time hints about the missing-data pattern of the observations.

The E-steps and the statistics choose between code paths by the NaN pattern of ``y``:
sequences with one shared pattern share a covariance pass, and fully observed data skip
the imputation terms. Inside ``jit`` the data are tracers, so by default both paths are
compiled and ``lax.cond`` picks one at run time. The eager entry points (``EM``,
``smooth``) know the data, so they compute the pattern once with NumPy, make it part of
the compiled function's cache key, and trace under :func:`assume_pattern`: only the
path taken is compiled (compilation is a large part of a short fit).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import numpy as np

COMPLETE = "complete"  # no NaN anywhere
SHARED = "shared"  # every sequence has the same NaN pattern (some NaN)
MIXED = "mixed"  # sequences differ
# ragged lengths (a time mask with False entries) and no NaN before any sequence's end:
# the E-steps treat it as MIXED (per-sequence passes, which use the mask); the
# statistics as COMPLETE within the mask (no imputation terms). Code that does not know
# this value takes its general path, which is also correct.
RAGGED = "ragged"

_HINT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "ppl_dyn_missing_pattern", default=None
)


def data_pattern(y, time_mask=None) -> Optional[str]:
    """The pattern of concrete observations ``y`` (``(T, dy)`` or ``(S, T, dy)``), or
    ``None`` when ``y`` is absent or traced. With a time mask ``(S, T)`` (ragged
    lengths) that drops some steps: :data:`RAGGED` when no observation before a
    sequence's end is missing, else :data:`MIXED`."""
    if y is None or isinstance(y, jax.core.Tracer):
        return None
    mask = np.isnan(np.asarray(y, dtype=float))
    if time_mask is not None and not np.all(time_mask):
        inside = np.asarray(time_mask, bool).reshape(mask.shape[:-1])[..., None]
        return MIXED if np.any(mask & inside) else RAGGED
    if not mask.any():
        return COMPLETE
    if mask.ndim < 3 or np.all(mask == mask[:1]):
        return SHARED
    return MIXED


@contextlib.contextmanager
def assume_pattern(pattern: Optional[str]):
    """Trace the code inside under the given pattern (``None``: unknown)."""
    token = _HINT.set(pattern)
    try:
        yield
    finally:
        _HINT.reset(token)


def pattern_hint() -> Optional[str]:
    """The pattern assumed by the enclosing :func:`assume_pattern`, if any."""
    return _HINT.get()
