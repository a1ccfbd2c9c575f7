"""The drivers' iteration loop: dispatch, host checks, progress bar, convergence.

:class:`~ppl_dyn.infer.EM` (and through it PSAEM, PGAS and online EM) and
:class:`~ppl_dyn.infer.SGD` run their compiled steps through :func:`run_loop`; they differ
only in what one step is and what they record of it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

__all__ = ["run_loop", "converged"]


def converged(values: Sequence[float], rtol: float, window: Optional[int]) -> bool:
    """``|v_k - v_{k-1}| <= rtol |v_{k-1}|`` for the last two values, or for the means
    of the last two windows of ``window`` values (noisy objectives)."""
    if window is None:
        return len(values) > 1 and abs(values[-1] - values[-2]) <= rtol * abs(values[-2])
    if len(values) < 2 * window:
        return False
    new, old = np.mean(values[-window:]), np.mean(values[-2 * window : -window])
    return abs(new - old) <= rtol * abs(old)


def run_loop(
    launch: Callable[[int, Any], Any],
    carry_of: Callable[[Any], Any],
    accept: Callable[[int, Any], tuple[float, float]],
    carry: Any,
    num_iters: int,
    *,
    desc: str,
    progress_bar: bool = True,
    rtol: Optional[float] = None,
    smoothing_window: Optional[int] = None,
    label: str = "log_marginal",
) -> tuple[list[float], bool]:
    """Run up to ``num_iters`` iterations of a compiled step.

    Args:
        launch: ``(it, carry) -> pending``: dispatch iteration ``it`` from ``carry``
            (asynchronous: JAX returns before the device has run it).
        carry_of: ``pending -> carry`` for the next iteration, taken from the pending
            results without reading them on the host.
        accept: ``(it, pending) -> (objective, shown)``: read iteration ``it``'s results
            on the host, check them (raise ``FloatingPointError`` naming the iteration)
            and record what the driver keeps. ``objective`` decides convergence,
            ``shown`` goes to the progress bar.
        carry: what iteration 0 starts from.
        rtol, smoothing_window: stop when :func:`converged` (None: run all).

    The next iteration is dispatched before this one's results are read, so the device
    never waits for the host's checks and dispatch (0.25 ms an iteration for EM at
    dx = 2, T = 1000); it is dropped when the run stops (convergence or an error): at
    most one iteration's work is wasted.

    Returns:
        ``(objectives, converged)``.
    """
    objectives: list[float] = []
    done = False
    bar = tqdm(range(num_iters), disable=not progress_bar, desc=desc, leave=False)
    pending = launch(0, carry)
    try:
        for it in bar:
            current = pending
            if it + 1 < num_iters:
                pending = launch(it + 1, carry_of(current))
            objective, shown = accept(it, current)
            objectives.append(objective)
            if progress_bar and (it % 10 == 0 or it == num_iters - 1):
                bar.set_postfix({label: f"{shown:.4f}"}, refresh=False)
            if rtol is not None and converged(objectives, rtol, smoothing_window):
                done = True
                break
    finally:
        bar.close()
    return objectives, done
