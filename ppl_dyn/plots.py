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


# --------------------------------------------------------------------------------------
# Figures of `ppl-dyn fit` (one PNG each; the report embeds them)
# --------------------------------------------------------------------------------------

_MAX_PANELS = 6  # observation / state dimensions drawn at most (first ones)


def _panels(n: int, title: str, height: float = 2.2):
    plt = _plt()
    k = min(n, _MAX_PANELS)
    fig, axes = plt.subplots(k, 1, figsize=(10, 1.0 + height * k), sharex=True, squeeze=False)
    fig.suptitle(title + (f" (first {k} of {n})" if n > k else ""))
    return plt, fig, axes[:, 0]


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def data_figure(path, time, y, names, time_name: str = "t", title: str = "data") -> None:
    """The observed series, one panel per column (sequence 1 when batched)."""
    y = np.asarray(y)
    y = y[0] if y.ndim == 3 else y
    plt, fig, axes = _panels(y.shape[1], title)
    for i, ax in enumerate(axes):
        ax.plot(time, y[:, i], ".-", ms=2.5, lw=0.6, color="0.25")
        ax.set_ylabel(names[i])
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(time_name)
    _save(plt, fig, path)


def band_figure(
    path,
    time,
    mean,
    lower,
    upper,
    names,
    *,
    y=None,
    y_time=None,
    time_name: str = "t",
    title: str = "",
    label: str = "fit",
) -> None:
    """Mean with a band per panel, observations as points (all arrays ``(n, k)``)."""
    mean, lower, upper = (np.asarray(a) for a in (mean, lower, upper))
    plt, fig, axes = _panels(mean.shape[1], title)
    for i, ax in enumerate(axes):
        if y is not None:
            ax.plot(y_time, np.asarray(y)[:, i], ".", ms=3, color="0.3", label="observed")
        (ln,) = ax.plot(time, mean[:, i], lw=1.2, color="C0", label=f"{label} mean")
        ax.fill_between(
            time, lower[:, i], upper[:, i], color=ln.get_color(), alpha=0.25, label=f"{label} band"
        )
        ax.set_ylabel(names[i])
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel(time_name)
    _save(plt, fig, path)


def em_curve_figure(
    path,
    log_marginals,
    *,
    title: str = "EM: log marginal likelihood",
    stages=None,
    xlabel: str = "EM iteration",
) -> None:
    """EM's log-marginal per iteration; ``stages`` = ``[(label, values), ...]`` draws
    several EM stages (e.g. LDS then RBF) one after another."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if stages:
        start = 0
        for label, vals in stages:
            vals = np.asarray(vals)
            ax.plot(start + np.arange(len(vals)), vals, ".-", ms=3, lw=1.2, label=label)
            start += len(vals)
        ax.legend(loc="lower right")
    else:
        ax.plot(np.arange(len(log_marginals)), log_marginals, ".-", ms=3, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("log marginal likelihood")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _save(plt, fig, path)


def trace_figure(path, idata, var_names) -> None:
    """ArviZ trace plot (compact) of the given posterior variables."""
    plt = _plt()
    import warnings

    import arviz as az

    with warnings.catch_warnings():  # arviz's own use of a deprecated matplotlib helper
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = az.plot_trace(idata, var_names=list(var_names), compact=True, show=False)
    fig = np.asarray(axes).ravel()[0].figure
    fig.set_size_inches(10, 1.9 * max(1, np.asarray(axes).shape[0]))
    _save(plt, fig, path)
