"""One process of the multi-process EM tests (run by ``ppl_dyn.distributed``'s launcher).

Usage: ``python -m ppl_dyn.launch --num-processes N tests/multiprocess_worker.py
OUT_DIR MODE``, with MODE ``full`` (every process passes the whole ragged batch),
``local`` (each process passes only its own sequences: ``process_local=True``),
``particles`` (one long sequence, the particle axis split over the processes) or
``combined`` (a two-axis mesh: sequences over one axis, particles over the other). Each
process writes ``OUT_DIR/result_<process>.json``.
"""

import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import ppl_dyn  # noqa: E402, F401  (joins the launcher's processes before JAX starts)
from ppl_dyn.infer import EM, KalmanSmoother, ParticleSmoother  # noqa: E402
from ppl_dyn.models import lds  # noqa: E402

NUM_ITERS = 20


def ragged_batch(num_sequences=11, seed=0):
    """The test batch: sequences of lengths 4..30 from one LDS (every process builds the
    same batch from the same seed)."""
    rng = np.random.default_rng(seed)
    A = np.array([[0.9, 0.2], [-0.2, 0.8]])
    C = np.array([[1.0, 0.5], [0.0, 1.0]])
    ys = []
    for _ in range(num_sequences):
        L = int(rng.integers(4, 31))
        x = rng.normal(size=2)
        y = np.empty((L, 2))
        for t in range(L):
            x = A @ x + 0.3 * rng.normal(size=2)
            y[t] = C @ x + 0.5 * rng.normal(size=2)
        ys.append(y)
    ys[min(3, num_sequences - 1)][2, 1] = np.nan  # a missing entry inside a sequence
    return ys


def start():
    return {
        "A": 0.5 * np.eye(2), "C": np.eye(2), "Q": 0.5 * np.eye(2), "R": np.eye(2),
        "b": np.zeros(2), "d": np.zeros(2), "m0": np.zeros(2), "P0": np.eye(2),
    }  # fmt: skip


def main(out_dir: str, mode: str) -> None:
    pid, n = jax.process_index(), jax.process_count()
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    result = {"process": pid, "num_processes": n, "num_devices": len(jax.devices())}
    if mode in ("full", "local"):
        ys = ragged_batch()
        if mode == "local":  # round-robin: process p keeps sequences p, p + n, ...
            ys = ys[pid::n]
        res = EM(lds, KalmanSmoother()).run(
            jax.random.key(0), NUM_ITERS, y=ys, state_dim=2, init_params=start(), mesh=mesh,
            process_local=mode == "local", progress_bar=False,
        )  # fmt: skip
        result["log_marginals"] = np.asarray(res.log_marginals).tolist()
        result["params"] = {k: np.asarray(v).tolist() for k, v in res.params.items()}
    elif mode == "particles":
        y = ragged_batch(1, seed=1)[0][:20]
        e_step = ParticleSmoother(num_particles=64, particle_mesh=mesh, chunk_size=16)
        res = EM(lds, e_step).run(
            jax.random.key(1), 3, y=y, state_dim=2, init_params=start(), progress_bar=False
        )
        result["log_marginals"] = np.asarray(res.log_marginals).tolist()
        result["params"] = {k: np.asarray(v).tolist() for k, v in res.params.items()}
    elif mode == "combined":  # sequences over one mesh axis, particles over the other
        ndev = len(jax.devices())
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, ndev // 2), ("seq", "particles"))
        e_step = ParticleSmoother(num_particles=32, particle_mesh=mesh2,
                                  particle_axes="particles", chunk_size=16)  # fmt: skip
        res = EM(lds, e_step).run(
            jax.random.key(2), 2, y=ragged_batch(4, seed=2), state_dim=2,
            init_params=start(), mesh=mesh2, sequence_axes="seq", progress_bar=False,
        )  # fmt: skip
        result["log_marginals"] = np.asarray(res.log_marginals).tolist()
        result["params"] = {k: np.asarray(v).tolist() for k, v in res.params.items()}
    else:
        raise ValueError(f"unknown mode {mode!r}")
    with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
