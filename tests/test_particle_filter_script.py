"""benchmarks/particle_filter.py runs at its smoke size and reports every part."""

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "benchmarks", "particle_filter.py")
    spec = importlib.util.spec_from_file_location("bench_particle_filter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_reports_ours_the_profile_and_the_bound(tmp_path):
    out = tmp_path / "pf.json"
    result = _load().main(["--quick", "--no-anchors", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["results"]
    assert row["N"] == 1000 and result["settings"]["T"] == 100
    assert row["ours_s"] > 0 and row["bound_s"] > 0
    assert math.isfinite(row["ours_log_marginal"])
    assert len(row["profile_s"]) == 5 and all(v > 0 for v in row["profile_s"].values())
    assert all(v > 0 for v in result["throughputs"].values())
