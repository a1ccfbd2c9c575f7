"""`ppl-dyn report DIR`: one static HTML page, figures embedded, rendered by a real
headless browser (Debian's chromium) in which every figure loads.

Two run directories: a real `ppl-dyn fit` (LDS by EM at tiny size) and a synthetic MCMC
run (random draws with sampler statistics, written with ArviZ; no JAX needed) for the
posterior-summary and diagnostics section.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import arviz as az
import numpy as np
import pytest

from ppl_dyn import cli
from ppl_dyn.report import ReportError, build_html, render_report

PNG = b"\x89PNG\r\n\x1a\n"
IMG_SRC = re.compile(r'<img\b[^>]*\bsrc="([^"]*)"')


@pytest.fixture(scope="module")
def em_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("em")
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=40)) * 0.3
    rows = [
        f"{1900 + t},{x[t] + 0.3 * rng.normal():.5f},{-x[t] + 0.3 * rng.normal():.5f}"
        for t in range(40)
    ]
    rows[7] = rows[7].split(",")[0] + ",," + rows[7].split(",")[2]  # one missing cell
    (d / "flow.csv").write_text("year,north,south\n" + "\n".join(rows) + "\n")
    out = d / "run"
    rc = cli.main(
        [
            "fit",
            "--data",
            str(d / "flow.csv"),
            "--time-column",
            "year",
            "--model",
            "lds",
            "--state-dim",
            "1",
            "--num-iters",
            "3",
            "--forecast-steps",
            "4",
            "--out",
            str(out),
            "--quiet",
            "--no-report",
        ]
    )
    assert rc == 0 and not (out / "report.html").exists()
    return out


def _png(path, color):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 1], color=color)
    fig.savefig(path, dpi=50)
    plt.close(fig)


@pytest.fixture(scope="module")
def mcmc_run(tmp_path_factory):
    """A run directory as `ppl-dyn fit --method nuts` writes it, with synthetic draws."""
    d = tmp_path_factory.mktemp("mcmc")
    rng = np.random.default_rng(1)
    c, n = 2, 60
    diverging = np.zeros((c, n), bool)
    diverging[1, 5] = diverging[0, 40] = True
    idata = az.from_dict(
        posterior={
            "A": 0.9 + 0.01 * rng.normal(size=(c, n, 1, 1)),
            "R": np.exp(0.1 * rng.normal(size=(c, n, 1, 1))),
        },
        sample_stats={
            "diverging": diverging,
            "energy": rng.normal(size=(c, n)),
            "lp": rng.normal(size=(c, n)),
            "acceptance_rate": rng.uniform(0.6, 1.0, size=(c, n)),
        },
        observed_data={"y": rng.normal(size=(30, 1))},
    )
    idata.to_netcdf(str(d / "idata.nc"))
    metrics = {
        "model": "lds",
        "method": "nuts",
        "data": "<b>x</b>.csv",
        "num_divergent": 2,
        "max_rhat": 1.002,
        "min_ess_bulk": 110.0,
        "min_ess_tail": 95.0,
        "diagnostic_problems": ["2 of 120 transitions diverged"],
        "log_marginals": list(np.linspace(-50, -40, 30)),
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    _png(d / "trace.png", "C1")
    _png(d / "fit.png", "C2")
    np.savez(d / "params.npz", A=np.array([[0.9]]), R=np.array([[1.0]]))
    return d


# --------------------------------------------------------------------------------------
# the page itself
# --------------------------------------------------------------------------------------


def _check_static(page: str, run_dir) -> list:
    """No scripts, no external resources; every <img> a PNG data URI that decodes."""
    from PIL import Image

    assert "<script" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', page), "external reference"
    srcs = IMG_SRC.findall(page)
    assert len(srcs) == len(list(run_dir.glob("*.png"))) >= 2
    sizes = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == PNG
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            sizes.append(im.size)
    assert all(w > 0 and h > 0 for w, h in sizes)
    return sizes


def test_em_report_is_one_static_page_with_every_figure(em_run, capsys):
    assert cli.main(["report", str(em_run)]) == 0
    assert f"report: {em_run / 'report.html'}" in capsys.readouterr().out
    page = (em_run / "report.html").read_text()
    _check_static(page, em_run)
    for fig in ("data.png", "fit.png", "states.png", "forecast.png", "em_curve.png"):
        assert f"<code>{fig}</code>" in page
    # metrics, fitted parameters and the EM summary from idata.nc
    metrics = json.loads((em_run / "metrics.json").read_text())
    assert "log_marginal_final" in page and "Fitted parameters" in page
    assert f"{metrics['log_marginal_final']:.6g}" in page
    assert "EM point estimate: " in page and "standardised" in page
    assert "north" in page and "predictions" in page  # column names, idata groups


def test_mcmc_report_has_summary_table_and_diagnostics(mcmc_run):
    page = (render_report(mcmc_run)).read_text()
    _check_static(page, mcmc_run)
    assert "r_hat" in page and "ess_bulk" in page  # az.summary
    assert "divergent transitions" in page and "2 of 120" in page
    assert "E-BFMI" in page and "transitions diverged" in page
    assert "&lt;b&gt;x&lt;/b&gt;.csv" in page and "<b>x</b>" not in page  # escaped
    assert "30 values: first -50" in page  # long lists summarised
    # figures in the documented order: fit before trace
    assert page.index("<code>fit.png</code>") < page.index("<code>trace.png</code>")


def test_report_errors_name_the_directory(tmp_path):
    with pytest.raises(ReportError, match="not a ppl-dyn run directory"):
        build_html(tmp_path)
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="not a JSON object"):
        render_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(ReportError, match="metrics.json: unreadable"):
        render_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ReportError, match="fake.png: not a PNG"):
        render_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------

# Appended to a COPY of the report (the report itself stays script-free): after the
# load event, write each image's state into the DOM, which --dump-dom then prints.
_PROBE = """
<img id="control-broken" src="data:image/png;base64,AAAA" alt="control">
<script>
window.addEventListener("load", function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.push((im.id || ("img" + i)) + ":" + (im.complete ? 1 : 0) + ":" +
             im.naturalWidth + "x" + im.naturalHeight);
  }
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = "IMG" + "PROBE " + out.join(" ") + " END";
  document.body.appendChild(pre);
});
</script>
"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail(
            "chromium is not installed: CI must install it (.ci/run runs "
            "`apt-get install -y chromium`); the report test needs a real browser"
        )
    pytest.skip("chromium not installed (apt-get install -y chromium); required under CI")


def _browser_image_states(page: str, tmp_path) -> dict:
    wrapper = tmp_path / "probe.html"
    wrapper.write_text(page.replace("</body>", _PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        wrapper.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"IMGPROBE (.*?) END", proc.stdout)
    assert found, "the probe did not run:\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    states = {}
    for item in found.group(1).split():
        name, complete, size = item.split(":")
        w, h = (int(v) for v in size.split("x"))
        states[name] = (complete == "1", w, h)
    return states


@pytest.mark.parametrize("which", ["em_run", "mcmc_run"])
def test_report_figures_load_in_headless_chromium(which, request, tmp_path):
    run_dir = request.getfixturevalue(which)
    page = render_report(run_dir).read_text()
    sizes = _check_static(page, run_dir)
    states = _browser_image_states(page, tmp_path)
    control = states.pop("control-broken")
    assert control[1] == 0, "the probe must detect a broken image"
    assert len(states) == len(sizes)
    for (name, (complete, w, h)), (pw, ph) in zip(states.items(), sizes, strict=True):
        assert complete and w > 0 and h > 0, f"{name} did not load in chromium"
        assert (w, h) == (pw, ph), f"{name}: browser size {(w, h)} != PNG size {(pw, ph)}"
