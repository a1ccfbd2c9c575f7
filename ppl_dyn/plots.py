"""Figures saved by the CLI and the examples (matplotlib, Agg backend)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_em_curve(ax, log_marginals, reference: Optional[float] = None, label="EM"):
    it = np.arange(len(log_marginals))
    ax.plot(it, log_marginals, "-", lw=1.5, label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="true parameters")
    lo = log_marginals[min(1, len(log_marginals) - 1)]
    hi = max(np.max(log_marginals), reference if reference is not None else -np.inf)
    pad = 0.05 * max(hi - lo, 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("log marginal likelihood")
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)


def plot_bands(ax, t, mean, sd, label, color=None, truth=None):
    (ln,) = ax.plot(t, mean, lw=1.2, label=label, color=color)
    ax.fill_between(t, mean - 2 * sd, mean + 2 * sd, color=ln.get_color(), alpha=0.25)
    if truth is not None:
        ax.plot(t, truth, "k--", lw=0.8, label="true")


def demo_figure(path, y, recon_mean, recon_sd, states_true, states_mean, states_sd, lls, true_ll):
    """Data with smoothed reconstruction, smoothed states with 2-sigma bands, EM curve."""
    plt = _plt()
    T, dy = y.shape
    dx = states_mean.shape[1]
    t = np.arange(T)
    fig, axes = plt.subplots(3, 1, figsize=(10, 10))
    ax = axes[0]
    spc = 4.0 * np.nanstd(y)
    for i in range(dy):
        ax.plot(t, y[:, i] + spc * i, ".", ms=2, color="0.4", label="observed" if i == 0 else None)
        plot_bands(
            ax,
            t,
            recon_mean[:, i] + spc * i,
            recon_sd[:, i],
            "smoothed E[y_t | y] ± 2 sd" if i == 0 else None,
            color="C0",
        )
    ax.set_title("data and smoothed reconstruction (sequence 1)")
    ax.set_xlabel("time")
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    for i in range(dx):
        plot_bands(
            ax,
            t,
            states_mean[:, i],
            states_sd[:, i],
            f"x[{i}] smoothed ± 2 sd",
            color=f"C{i}",
            truth=states_true[:, i] if i == 0 else None,
        )
        if i > 0:
            ax.plot(t, states_true[:, i], "k--", lw=0.8)
    ax.set_title("smoothed states of the fitted model (mapped to the true basis) vs truth")
    ax.set_xlabel("time")
    ax.legend(loc="upper right", fontsize=8)
    plot_em_curve(axes[2], np.asarray(lls), true_ll)
    axes[2].set_title("EM: log marginal likelihood (non-decreasing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
