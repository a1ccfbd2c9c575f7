"""benchmarks/accelerator.py runs every case at small sizes on any device (the CPU
here), so the script a GPU session runs is known to work before the GPU is lent. The
default run takes the three cheap cases; NUTS (its compilation alone is ~30 s on a CPU)
runs in the slow tier."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _run(tmp_path, cases):
    spec = importlib.util.spec_from_file_location("accelerator", ROOT / "benchmarks" /
                                                  "accelerator.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "acc.json"
    mod.main(["--small", "--out", str(out), "--cases", ",".join(cases)])
    report = json.loads(out.read_text())
    assert report["small"] and report["device"].startswith(("cpu", "gpu", "cuda", "tpu"))
    assert set(report["cases"]) == set(cases)
    return report["cases"]


def test_accelerator_benchmark_runs_small_on_this_device(tmp_path):
    cases = _run(tmp_path, ["ffbsm", "ffbsi_mcmc", "ragged_em"])
    assert 0 < cases["ffbsm"]["exp_bound_seconds"] <= cases["ffbsm"]["seconds"]
    assert cases["ffbsi_mcmc"]["seconds"] > 0 and cases["ragged_em"]["seconds_per_iteration"] > 0


@pytest.mark.slow
def test_accelerator_benchmark_nuts_case_runs_small(tmp_path):
    cases = _run(tmp_path, ["nuts_marginal"])
    assert cases["nuts_marginal"]["seconds_per_draw"] > 0
