"""Benchmark: one EM iteration over many sequences, and the sequence axis sharded.

Run from the repository root::

    python benchmarks/many_sequences.py [--quick] [--out results.json] [--float32]

Pure JAX: it runs on whatever backend JAX picks (CPU, GPU); ``jax.devices()`` is
printed and recorded.

What is measured (LDS, ``dx = dy = 2``, ``T = 100``; all of A, b, Q, C, d, R, m0, P0
estimated; the KalmanSmoother E-step and the closed-form M-step):

* **per-iteration time** of the jitted EM step (E-step + M-step, one dispatch; compile
  excluded, median of repeats) for ``S = 1, 16, 256, 4096`` sequences, in two data
  layouts:
    - ``equal``: every sequence of length ``T``, fully observed (the Kalman smoother's
      shared-covariance path: one covariance pass for all sequences);
    - ``ragged``: lengths drawn uniformly from ``[T/2, T]``, padded and masked (one
      Kalman pass per sequence, vmapped).
* **sharded vs unsharded** (``--sharded-devices 8``, the default): in a child process
  with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on CPU (or the real
  devices on an accelerator host), the same ragged EM step with the sequence axis
  sharded over a ``Mesh`` of all devices, and the largest absolute difference of the
  parameters after the step. On one CPU the 8 "devices" share its cores: expect no
  speed-up; it is a correctness and overhead check.

``--quick`` uses ``S = 1, 16, 256`` and 3 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def make_data(S, T, seed, ragged):
    import numpy as np

    rng = np.random.default_rng(seed)
    A = np.array([[0.9, 0.1], [-0.1, 0.8]])
    C = rng.normal(size=(2, 2))
    x = np.zeros((S, T, 2))
    x[:, 0] = rng.normal(size=(S, 2))
    for t in range(1, T):
        x[:, t] = x[:, t - 1] @ A.T + 0.3 * rng.normal(size=(S, 2))
    y = x @ C.T + 0.5 * rng.normal(size=(S, T, 2))
    lengths = rng.integers(T // 2, T + 1, size=S) if ragged else None
    start = dict(
        A=0.5 * np.eye(2),
        b=np.zeros(2),
        Q=np.eye(2),
        C=rng.normal(size=(2, 2)),
        d=np.zeros(2),
        R=np.eye(2),
        m0=np.zeros(2),
        P0=np.eye(2),
    )
    return y, lengths, start


def time_em_step(S, T, ragged, repeats, dtype, mesh=None, seed=0):
    """Median seconds of one jitted EM step, and the parameters after one step."""
    import jax
    import numpy as np

    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.infer._run import pad_to_multiple, ragged_data, validate_data
    from ppl_dyn.infer.em import shard_sequences
    from ppl_dyn.models import lds

    y, lengths, start = make_data(S, T, seed, ragged)
    y = y.astype(dtype)
    em = EM(lds, KalmanSmoother())
    kwargs, time_mask = ragged_data({"y": y, "state_dim": 2}, lengths)
    kwargs = validate_data(kwargs)
    state = em.init(jax.random.key(0), init_params=start, **kwargs)
    params = {k: jax.numpy.asarray(v, dtype) for k, v in state.params.items()}
    if mesh is not None:
        kwargs, time_mask = pad_to_multiple(kwargs, time_mask, mesh.devices.size)
    step, dynamic = em._compiled(kwargs, time_mask=time_mask)
    mask_arg = () if time_mask is None else (time_mask,)
    if mesh is not None:
        params, dynamic, mask_arg = shard_sequences(mesh, params, dynamic, mask_arg)
    else:
        dynamic = jax.device_put(dynamic)
        mask_arg = jax.device_put(mask_arg)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(params, dynamic, key, 0, *mask_arg))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, dynamic, key, 0, *mask_arg))
        times.append(time.perf_counter() - t0)
    new = {k: np.asarray(v).tolist() for k, v in out[0].items()}
    return dict(
        S=S,
        T=T,
        layout="ragged" if ragged else "equal",
        per_iter_s=statistics.median(times),
        first_call_s=compile_s,
        log_marginal=float(out[1]),
        params=new,
    )


def sharded_child(args):
    """Runs in the child process (device count fixed before JAX starts)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    jax.config.update("jax_enable_x64", not args.float32)
    dtype = np.float32 if args.float32 else np.float64
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    S = args.child_sequences
    one = time_em_step(S, args.T, True, args.repeats, dtype)
    sharded = time_em_step(S, args.T, True, args.repeats, dtype, mesh=mesh)
    diff = max(
        float(np.max(np.abs(np.asarray(one["params"][k]) - np.asarray(sharded["params"][k]))))
        for k in one["params"]
    )
    res = dict(
        devices=[str(d) for d in jax.devices()],
        S=S,
        T=args.T,
        unsharded_per_iter_s=one["per_iter_s"],
        sharded_per_iter_s=sharded["per_iter_s"],
        max_abs_param_diff=diff,
        log_marginal_diff=abs(one["log_marginal"] - sharded["log_marginal"]),
    )
    print("CHILD" + json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--float32", action="store_true")
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--sharded-devices", type=int, default=8)
    p.add_argument("--child-sequences", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.child:
        return sharded_child(args)

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", not args.float32)
    dtype = np.float32 if args.float32 else np.float64
    print("jax.devices():", jax.devices())
    counts = [1, 16, 256] if args.quick else [1, 16, 256, 4096]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for ragged in (False, True):
            for S in counts:
                r = time_em_step(S, args.T, ragged, args.repeats, dtype)
                r.pop("params")
                rows.append(r)
                print(
                    f"{r['layout']:>6}  S={S:5d}  T={args.T}  per-iteration "
                    f"{1e3 * r['per_iter_s']:9.2f} ms  ({1e6 * r['per_iter_s'] / S:8.2f} us "
                    f"per sequence; first call {r['first_call_s']:.1f} s)",
                    flush=True,
                )
    sharded = None
    if args.sharded_devices > 1:
        env = dict(os.environ)
        if jax.default_backend() == "cpu":
            flag = f"--xla_force_host_platform_device_count={args.sharded_devices}"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
        S = 256 if args.quick else 4096
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--T", str(args.T)]
        cmd += ["--child-sequences", str(S), "--repeats", str(args.repeats)]
        if args.float32:
            cmd.append("--float32")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("CHILD")]
        if proc.returncode != 0 or not line:
            print("sharded child failed:\n" + proc.stderr[-3000:])
        else:
            sharded = json.loads(line[0][len("CHILD") :])
            print(
                f"sharded over {len(sharded['devices'])} devices, S={S}: "
                f"{1e3 * sharded['sharded_per_iter_s']:.2f} ms vs unsharded "
                f"{1e3 * sharded['unsharded_per_iter_s']:.2f} ms per iteration; "
                f"max |param diff| {sharded['max_abs_param_diff']:.2e}, "
                f"|log-marginal diff| {sharded['log_marginal_diff']:.2e}"
            )
    result = dict(
        benchmark="many_sequences",
        quick=args.quick,
        dtype="float32" if args.float32 else "float64",
        devices=[str(d) for d in jax.devices()],
        platform=platform.platform(),
        rows=rows,
        sharded=sharded,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
