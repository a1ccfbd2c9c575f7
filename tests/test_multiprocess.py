"""EM on JAX's multi-controller runtime: 2 and 4 local processes joined by
``jax.distributed`` (localhost coordinator, gloo CPU collectives), started by
``ppl_dyn.launch``'s launcher exactly as docs/scale.md shows. Every process must return
the numbers of a single-process run (to 1e-10) and the same numbers as the others.
Slow tier: each case starts fresh processes (several seconds of JAX start-up each)."""

import json
import os
import pathlib
import sys
import time

import jax
import multiprocess_worker as W
import numpy as np
import pytest

from ppl_dyn.distributed import launch_local
from ppl_dyn.infer import EM, KalmanSmoother, ParticleSmoother
from ppl_dyn.models import lds

pytestmark = pytest.mark.slow
WORKER = str(pathlib.Path(__file__).with_name("multiprocess_worker.py"))


def run_processes(tmp_path, num_processes, mode, devices_per_process=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(WORKER).parent.parent)] + sys.path)
    t0 = time.perf_counter()
    results = launch_local([sys.executable, WORKER, str(tmp_path), mode], num_processes,
                           env=env, timeout=600)  # fmt: skip
    wall = time.perf_counter() - t0
    for pid, r in enumerate(results):
        assert r.returncode == 0, (pid, r.stderr[-3000:])
    assert len(results) == num_processes
    outs = [json.loads((tmp_path / f"result_{p}.json").read_text()) for p in range(num_processes)]
    assert {o["num_devices"] for o in outs} == {num_processes * devices_per_process}
    print(f"\n{mode}: {num_processes} processes x {devices_per_process} devices: {wall:.1f} s")
    return outs


def _close(outs, ref_lls, ref_params, tol=1e-10):
    for o in outs:
        np.testing.assert_allclose(o["log_marginals"], ref_lls, rtol=tol, atol=tol)
        for k, v in ref_params.items():
            np.testing.assert_allclose(np.asarray(o["params"][k]), np.asarray(v), atol=tol)
    first = outs[0]
    for o in outs[1:]:  # every process returns the same values
        assert o["log_marginals"] == first["log_marginals"]
        assert o["params"] == first["params"]


@pytest.fixture(scope="module")
def reference():
    """The same ragged EM fit in this (single) process, without a mesh."""
    res = EM(lds, KalmanSmoother()).run(
        jax.random.key(0), W.NUM_ITERS, y=W.ragged_batch(), state_dim=2,
        init_params=W.start(), progress_bar=False,
    )  # fmt: skip
    return np.asarray(res.log_marginals), {k: np.asarray(v) for k, v in res.params.items()}


@pytest.mark.parametrize(
    "num_processes, mode, devices",
    [(2, "full", 1), (2, "local", 1), (4, "local", 1), (2, "local", 2), (1, "full", 1)],
)
def test_multiprocess_em_equals_single_process(tmp_path, reference, num_processes, mode,
                                                 devices):  # fmt: skip
    """20 EM iterations on a ragged batch of 11 sequences (one with a missing entry),
    sharded over the processes' devices; "local": each process holds only its own
    sequences (process_local=True), the global arrays built from the pieces."""
    outs = run_processes(tmp_path, num_processes, mode, devices)
    _close(outs, *reference)


def test_particle_axis_split_over_processes_equals_single_process(tmp_path):
    outs = run_processes(tmp_path, 2, "particles")
    y = W.ragged_batch(1, seed=1)[0][:20]
    res = EM(lds, ParticleSmoother(num_particles=64, chunk_size=16)).run(
        jax.random.key(1), 3, y=y, state_dim=2, init_params=W.start(), progress_bar=False
    )
    _close(outs, np.asarray(res.log_marginals), res.params)


def test_sequences_and_particles_on_a_two_axis_mesh_of_four_processes(tmp_path):
    outs = run_processes(tmp_path, 4, "combined")
    res = EM(lds, ParticleSmoother(num_particles=32, chunk_size=16)).run(
        jax.random.key(2), 2, y=W.ragged_batch(4, seed=2), state_dim=2, init_params=W.start(),
        progress_bar=False,
    )  # fmt: skip
    _close(outs, np.asarray(res.log_marginals), res.params)
