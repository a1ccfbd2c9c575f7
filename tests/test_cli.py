"""The README's main job, at tiny size: `ppl-dyn demo` writes its report."""

import json
import subprocess
import sys


def test_demo_writes_metrics_and_figure(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "ppl_dyn.cli", "demo", "--out", str(out),
         "--num-steps", "60", "--num-sequences", "2", "--num-iters", "15", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["em_monotone"] is True
    assert len(metrics["log_marginals"]) == metrics["em_iterations"]
    # EM started from a prior draw must end near (or above) the truth's likelihood
    assert metrics["log_marginal_fitted"] > metrics["log_marginals"][0]
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(json.loads((out / "params.json").read_text())) >= {"A", "C", "Q", "R"}
    assert "report:" in proc.stdout


def test_demo_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppl_dyn.cli", "demo", "--out", str(tmp_path / "x"),
         "--num-steps", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--num-steps" in proc.stderr
    assert not (tmp_path / "x").exists()
