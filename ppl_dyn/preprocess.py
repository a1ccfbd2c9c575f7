"""Standardising series the way the command line does, for use from Python."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["Standardized", "standardize"]


class Standardized(NamedTuple):
    """``y`` centred and scaled per column: ``y = (raw - mean) / scale``.

    Attributes:
        y: the standardised array (same shape as the input; NaN stays NaN).
        mean, scale: ``(k,)`` per column.
    """

    y: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def inverse(self, a) -> np.ndarray:
        """Values (or forecasts, bands, samples with the columns last) back in the
        original units: ``a * scale + mean``."""
        return np.asarray(a, dtype=float) * self.scale + self.mean

    def inverse_scale(self, a) -> np.ndarray:
        """Spreads (standard deviations, RMSE, MAE, CRPS) in the original units:
        ``a * scale``."""
        return np.asarray(a, dtype=float) * self.scale


def standardize(y, *, fit_steps: Optional[int] = None) -> Standardized:
    """Centre and scale each column of ``y`` (``(T, k)``, ``(T,)`` or ``(S, T, k)``; NaN
    = missing) by the mean and standard deviation of its first ``fit_steps`` time steps
    (default: all), as ``ppl-dyn fit`` and ``ppl-dyn backtest`` do. Statistics from a
    training span only keep a held-out tail out of the fit.

    Raises:
        ValueError: a column with no observed value, or constant, in the span.
    """
    raw = np.asarray(y, dtype=float)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.ndim not in (2, 3):
        raise ValueError(f"y must be (T,), (T, k) or (S, T, k); got shape {raw.shape}")
    T = raw.shape[-2]
    n = T if fit_steps is None else int(fit_steps)
    if not 1 <= n <= T:
        raise ValueError(f"fit_steps must be in [1, {T}]; got {fit_steps}")
    span = raw[..., :n, :].reshape(-1, raw.shape[-1])
    with np.errstate(invalid="ignore"):
        seen = np.isfinite(span).sum(0)
        mean = np.nanmean(np.where(seen > 0, span, 0.0), 0)
        scale = np.nanstd(np.where(seen > 0, span, 0.0), 0)
    for j in range(raw.shape[-1]):
        if seen[j] == 0:
            raise ValueError(f"column {j} of y has no observed value in the first {n} steps")
        if not scale[j] > 0:
            raise ValueError(f"column {j} of y is constant in the first {n} steps")
    return Standardized((raw - mean) / scale, mean, scale)
