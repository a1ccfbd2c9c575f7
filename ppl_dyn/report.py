"""One self-contained HTML page from a run directory (``ppl-dyn report DIR``).

A run directory is what ``ppl-dyn fit`` or ``ppl-dyn demo`` writes: ``metrics.json``
(required), PNG figures, ``params.npz`` and ``idata.nc``. :func:`render_report` writes
``DIR/report.html``: the run's settings and metrics, every figure embedded as a base64
``data:image/png`` URI, the fitted parameters (EM) or ArviZ's summary table and the
sampler diagnostics (MCMC). The page is static: no scripts, no external style sheets,
fonts or images, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["ReportError", "render_report", "is_run_dir"]

#: figures and their captions, in the order the page shows them; other PNGs follow
FIGURE_CAPTIONS = {
    "demo.png": "Data with the smoothed reconstruction, smoothed states with 2-sigma bands "
    "(mapped to the true basis) and the EM curve.",
    "data.png": "The observed series (original units).",
    "fit.png": "Fit: observations and the posterior predictive band (replicated data "
    "given all observations; original units).",
    "states.png": "Smoothed latent states with ±2 sd bands (standardised units).",
    "forecast.png": "Forecast beyond the data with its predictive band (original units).",
    "em_curve.png": "EM: the log marginal likelihood of the parameters entering each iteration.",
    "sgd_curve.png": "SGD: the log marginal likelihood at each optimiser step.",
    "trace.png": "MCMC trace plot (marginal posteriors and draws per chain).",
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-family: monospace; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto;
         border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
code, pre { background: #f6f6f6; padding: .1em .3em; }
.warn { color: #a40; } .ok { color: #080; }
"""


class ReportError(ValueError):
    """The directory cannot be reported on; ``str(err)`` is one line naming it."""


def is_run_dir(path) -> bool:
    """Whether ``path`` holds a run's ``metrics.json``."""
    return (Path(path) / "metrics.json").is_file()


def _load_metrics(d: Path) -> dict:
    if not d.exists():
        raise ReportError(f"{d}: no such directory")
    if not d.is_dir():
        raise ReportError(f"{d}: not a directory")
    if not is_run_dir(d):
        raise ReportError(
            f"{d}: not a ppl-dyn run directory (no metrics.json; run `ppl-dyn fit` or "
            "`ppl-dyn demo` first)"
        )
    try:
        metrics = json.loads((d / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{d / 'metrics.json'}: unreadable ({err})") from None
    if not isinstance(metrics, dict):
        raise ReportError(f"{d / 'metrics.json'}: not a JSON object")
    return metrics


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        flat = list(np.ravel(np.asarray(v, dtype=object)))
        if len(flat) > 8:
            nums = [x for x in flat if isinstance(x, (int, float)) and x is not None]
            if len(nums) == len(flat):
                return (
                    f"{len(flat)} values: first {_fmt(flat[0])}, last {_fmt(flat[-1])}, "
                    f"min {_fmt(min(nums))}, max {_fmt(max(nums))}"
                )
            return f"{len(flat)} values"
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "{}"
    return str(v)


def _metrics_table(metrics: dict) -> str:
    rows = []
    for k, v in metrics.items():
        if k in ("command", "diagnostic_problems", "verdict"):
            continue
        cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        rows.append(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(_fmt(v))}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _png_data_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ReportError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figures(d: Path) -> str:
    pngs = sorted(p.name for p in d.glob("*.png") if p.is_file())
    order = [n for n in FIGURE_CAPTIONS if n in pngs] + [
        n for n in pngs if n not in FIGURE_CAPTIONS
    ]
    parts = []
    for name in order:
        uri = _png_data_uri(d / name)
        cap = FIGURE_CAPTIONS.get(name, name)
        parts.append(
            f'<figure id="fig-{_esc(Path(name).stem)}"><img src="{uri}" '
            f'alt="{_esc(name)}"><figcaption><code>{_esc(name)}</code>: {_esc(cap)}'
            "</figcaption></figure>"
        )
    return "\n".join(parts) if parts else "<p>No figures in this run directory.</p>"


def _array_text(a: np.ndarray, max_entries: int = 36) -> str:
    a = np.asarray(a)
    if a.size > max_entries:
        flat = a.ravel()
        return f"shape {a.shape}: " + ", ".join(f"{x:.4g}" for x in flat[:max_entries]) + ", ..."
    with np.printoptions(precision=4, suppress=True, linewidth=100):
        return np.array2string(a)


def _params_table(d: Path) -> str:
    path = d / "params.npz"
    if not path.is_file():
        return ""
    try:
        with np.load(path, allow_pickle=False) as z:
            params = {k: np.asarray(z[k]) for k in z.files}
    except Exception as err:  # noqa: BLE001 - report what is wrong, keep the page
        return f'<p class="warn">params.npz unreadable: {_esc(type(err).__name__)}</p>'
    rows = [
        f"<tr><th>{_esc(k)}</th><td>{_esc(v.shape)}</td><td><pre>{_esc(_array_text(v))}"
        "</pre></td></tr>"
        for k, v in params.items()
    ]
    return (
        "<h2>Fitted parameters</h2>\n<table><tr><th>site</th><th>shape</th>"
        "<th>value</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _idata_section(d: Path, metrics: dict) -> str:
    path = d / "idata.nc"
    if not path.is_file():
        return ""
    import arviz as az

    try:
        idata = az.from_netcdf(str(path))
    except Exception as err:  # noqa: BLE001
        return f'<p class="warn">idata.nc unreadable: {_esc(type(err).__name__)}</p>'
    parts = ["<h2>ArviZ InferenceData (<code>idata.nc</code>)</h2>"]
    groups = ", ".join(_esc(g) for g in idata.groups())
    parts.append(f"<p>Groups: {groups}.</p>")
    post = getattr(idata, "posterior", None)
    if post is None:
        return "\n".join(parts)
    n_draws = int(post.sizes.get("chain", 1)) * int(post.sizes.get("draw", 1))
    skip = {"x", "x_innovations"}
    var_names = [
        v
        for v in post.data_vars
        if v not in skip and not str(v).startswith("y_") and post[v].size / n_draws <= 64
    ]
    if n_draws > 1 and var_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = az.summary(idata, var_names=var_names, round_to=4)
        parts.append("<h3>Posterior summary (<code>az.summary</code>)</h3>")
        parts.append(summary.to_html(classes="summary", border=0))
        parts.append(_mcmc_diagnostics(idata, metrics))
    elif "sample_stats" in idata.groups() and "log_marginal" in idata.sample_stats:
        lm = np.asarray(idata.sample_stats["log_marginal"]).ravel()
        if lm.size:
            parts.append(
                f"<p>EM point estimate: {lm.size} iterations, log marginal likelihood "
                f"{lm[0]:.6g} → {lm[-1]:.6g}.</p>"
            )
    return "\n".join(parts)


def _mcmc_diagnostics(idata, metrics: dict) -> str:
    stats = getattr(idata, "sample_stats", None)
    rows = []
    if stats is not None and "diverging" in stats:
        n = int(np.sum(np.asarray(stats["diverging"])))
        total = int(np.asarray(stats["diverging"]).size)
        rows.append(("divergent transitions", f"{n} of {total}"))
    if stats is not None and "energy" in stats:
        import arviz as az

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bfmi = np.asarray(az.bfmi(idata))
        rows.append(("E-BFMI per chain", ", ".join(f"{b:.3f}" for b in bfmi)))
    if stats is not None and "acceptance_rate" in stats:
        rows.append(("mean acceptance rate", f"{float(np.mean(stats['acceptance_rate'])):.3f}"))
    if stats is not None and "tree_depth" in stats:
        rows.append(("max tree depth", str(int(np.max(stats["tree_depth"])))))
    for key, label in (
        ("max_rhat", "max R-hat"),
        ("min_ess_bulk", "min bulk ESS"),
        ("min_ess_tail", "min tail ESS"),
    ):
        if key in metrics:
            rows.append((label, _fmt(metrics[key])))
    out = ["<h3>Sampler diagnostics</h3>", "<table>"]
    out += [f'<tr><th>{_esc(a)}</th><td class="num">{_esc(b)}</td></tr>' for a, b in rows]
    out.append("</table>")
    problems = metrics.get("diagnostic_problems")
    if problems:
        out.append('<ul class="warn">' + "".join(f"<li>{_esc(p)}</li>" for p in problems) + "</ul>")
    elif problems is not None:
        out.append(
            '<p class="ok">All checks passed (R-hat &lt; 1.01, ESS ≥ 100 per chain, '
            "no divergences).</p>"
        )
    return "\n".join(out)


def build_html(run_dir, display_name=None) -> str:
    """The report page for ``run_dir`` as a string (raises :class:`ReportError`);
    ``display_name`` is the directory name the page shows (default: ``run_dir``)."""
    d = Path(run_dir)
    metrics = _load_metrics(d)
    model = metrics.get("model", "?")
    method = metrics.get("method", "?")
    title = f"ppl-dyn run: {model} by {method}"
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    verdict = metrics.get("verdict")
    if isinstance(verdict, dict) and verdict.get("line"):  # the first thing a reader sees
        cls = "ok" if verdict.get("ok") else "warn"
        head.append(f'<p class="{cls}"><strong>{_esc(verdict["line"])}</strong></p>')
    head += [
        f"<p>Run directory <code>{_esc(display_name or d)}</code>",
    ]
    if metrics.get("data"):
        head.append(f"; data <code>{_esc(metrics['data'])}</code>")
    head.append(".</p>")
    if metrics.get("command"):
        head.append(f"<p>Command: <code>{_esc(metrics['command'])}</code></p>")
    if metrics.get("standardized"):
        head.append(
            "<p>The data were standardised column by column before fitting (mean "
            f"{_esc(_fmt(metrics.get('data_mean')))}, scale "
            f"{_esc(_fmt(metrics.get('data_scale')))}): parameters, states and "
            "log-likelihoods refer to the standardised data; data, fit and forecast "
            "figures are in the original units.</p>"
        )
    body = [
        "<h2>Metrics (<code>metrics.json</code>)</h2>",
        _metrics_table(metrics),
        "<h2>Figures</h2>",
        _figures(d),
        _params_table(d),
        _idata_section(d, metrics),
        "</body></html>",
    ]
    return "\n".join(head + body) + "\n"


def render_report(run_dir, display_name=None) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path.

    Raises:
        ReportError: ``run_dir`` is missing, not a directory, or has no readable
            ``metrics.json``; or a figure is not a PNG.
    """
    d = Path(run_dir)
    page = build_html(d, display_name)
    out = d / "report.html"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".report-", suffix=".html")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
