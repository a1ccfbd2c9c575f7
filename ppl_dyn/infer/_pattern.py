"""The missing-data pattern of the observations, for the plug-ins that can use it.

The E-steps and the statistics choose between code paths by the NaN pattern of ``y``:
sequences with one shared pattern share a covariance pass, and fully observed data skip
the imputation terms. Inside ``jit`` the data are tracers, so by default both paths are
compiled and ``lax.cond`` picks one at run time. The eager entry points (``EM``,
``smooth``, ``OnlineEM``) know the data, so they compute the pattern once with NumPy,
make it part of the compiled function's cache key, and give it to the plug-ins before
tracing (:func:`with_data_pattern`: a plug-in that can use it has a ``data_pattern``
field and a ``with_data_pattern`` method returning a copy with that field set). Only the
path taken is then compiled (compilation is a large part of a short fit). The pattern
travels as a static field of the plug-in values and as explicit arguments below them; no
global or context state is involved.
"""

from __future__ import annotations

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


def with_data_pattern(plugin, pattern: Optional[str]):
    """``plugin`` told the data's pattern (its ``with_data_pattern(pattern)``) when it
    has that method and the pattern is known; otherwise ``plugin`` itself (a user's
    plug-in needs nothing of this)."""
    tell = getattr(plugin, "with_data_pattern", None)
    if pattern is None or not callable(tell):
        return plugin
    return tell(pattern)
