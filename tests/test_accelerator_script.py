"""benchmarks/accelerator.py runs every case at small sizes on any device (the CPU
here), so the script a GPU session runs is known to work before the GPU is lent."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def test_accelerator_benchmark_runs_small_on_this_device(tmp_path):
    spec = importlib.util.spec_from_file_location("accelerator", ROOT / "benchmarks" /
                                                  "accelerator.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "acc.json"
    mod.main(["--small", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["small"] and report["device"].startswith(("cpu", "gpu", "cuda", "tpu"))
    cases = report["cases"]
    assert set(cases) == {"ffbsm", "ffbsi_mcmc", "ragged_em", "nuts_marginal"}
    assert 0 < cases["ffbsm"]["exp_bound_seconds"] <= cases["ffbsm"]["seconds"]
    assert cases["ffbsi_mcmc"]["seconds"] > 0 and cases["ragged_em"]["seconds_per_iteration"] > 0
    assert cases["nuts_marginal"]["seconds_per_draw"] > 0
