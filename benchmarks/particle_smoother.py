"""Benchmark: one particle E-step (filter + FFBSm) -- ppl_dyn vs ``particles`` vs a bound.

Run from the repository root::

    python benchmarks/particle_smoother.py [--quick] [--out results.json]

It needs the ``particles`` library (N. Chopin). ``particles`` pins ``numpy<2`` but works
with numpy 2, so install it WITHOUT its dependencies, or pip will downgrade numpy::

    pip install --no-deps particles

``--quick`` is a smoke-sized run (T = 100, N <= 200; 2-3 minutes, mostly process start-up
and compilation). The full run takes about 20-30 minutes on a 2-core CPU (most of it
ppl_dyn at N = 4000 and ``particles`` at N = 1000, ~90 s). Close other CPU-heavy
processes first: timings are wall-clock and a concurrent job inflates them 1.5-2x.

Note: XLA's CPU buffers come from glibc malloc. With glibc's default trim threshold the
large FFBSm blocks went back to the OS after each call and were faulted in again (high
``sys`` time; some calls 1.5x slower, 6.5 s vs 3.4 s at N = 1000, dx = 5 in one fresh
process). Each child calls ``ppl_dyn.keep_freed_memory()`` (glibc's
``M_TRIM_THRESHOLD``, ``ppl_dyn/_malloc.py``), as the ``ppl-dyn`` command does; a library
user opts in with the same call.

What is measured (CPU unless JAX picks another backend), all on the same simulated data:

* **ours** -- one jitted E-step for the noisy tanh-RNN (``ppl_dyn.models.tanh_rnn``,
  ``bias=False``, dy = 1, T = 1000, dx in {2, 5}, N in {100, 1000, 4000}): bootstrap
  particle filter + FFBSm marginal weights and two-slice pair moments
  (``ParticleSmoother.posterior``) + the expected sufficient statistics
  (``LinearGaussianMStep().statistics``), in float64 and in float32. Each precision runs in
  its own child process (float64: ``jax_enable_x64``), every (precision, dx, N) case in a
  fresh child with a time limit (retried on a hang). Compilation is excluded
  (``jax.jit(...).lower(...).compile()`` first); the reported time is the median of
  ``repeats`` calls (N <= 1000: after one untimed warm-up call; N = 4000: every call is
  timed, there is no warm-up). At N = 4000 ``chunk_size`` in {None, 256, 1024} is swept
  (one call each) and the best one gets extra calls; its median is reported. For
  N <= 1000 the default ``chunk_size=1024`` (one chunk, i.e. the same as None) is used.
* **particles** -- ``particles.SMC(fk=Bootstrap(ssm=TanhRNN(...)), N, store_history=True)``
  followed by ``hist.backward_sampling_ON2(M=N)``, the library's O(N^2) per step offline
  smoother (``"FFBS_ON2"`` in ``particles.smoothing.smoothing_worker``): N exact FFBS
  trajectories, each backward step weighing all N filter particles, i.e. T * N^2
  transition densities, as in FFBSm. The same EM statistics are then averaged over the N
  trajectories. float64 (numpy), dx = 2, N in {100, 1000}, run once each (the N = 1000
  run takes minutes); N = 4000 is skipped (about 16x the N = 1000 time). The child runs
  with ``OPENBLAS_NUM_THREADS=1`` set before numpy is imported (with threaded OpenBLAS
  its tiny per-particle BLAS calls run 40-60x slower).
* **bound** -- an arithmetic lower bound for the FFBSm backward pass from this machine's
  throughput measured in the same run and precision: exponentials/s of ``jnp.exp`` on
  cache-sized arrays (2^16, 2^18, 2^20 elements; many calls issued back to back -- a
  2^24-element array measures memory bandwidth instead, 2-5x lower), and of ``exp``
  fused into a row sum over a (64 | 256 | 1024, 1024) block repeated inside one jitted
  ``scan`` (no output written, no dispatch per call: the array calls read up to 1.5x
  lower on a busy machine, and a bound from them alone was once below our own time;
  the best of both is used), and flop/s of a
  1024 / 2048 square ``jnp.matmul``; for each, the best over sizes and over one or two
  concurrently dispatching threads, so that all cores count.
  With P = (T - 1) N^2 particle pairs and k = dx dynamics features (``tanh(x)``,
  ``bias=False``) the backward pass needs at least

      exps  = P                         (one exp per pair for the N x N weights)
      flops = P * (2 dx + 2 k)          (pairwise distances a b^T: dx multiply-adds per
                                         pair; pair moments W phi: k multiply-adds per pair;
                                         a multiply-add = 2 flops)

  and ``bound = exps / exp_rate + flops / flop_rate`` (the SUM: exp and multiply-adds run
  on the same vector units of the same cores, so they do not overlap). The ``max`` of the
  two terms, a looser bound, is reported as well. The O(T N) filter and statistics are
  not counted, so the bound is optimistic.

Printed ratios: particles / ours at N = 1000 (dx = 2, float64; target >= 100x) and
ours / bound at N = 4000 for each dx and precision (target <= 3x).
"""

import os

# Before numpy is imported anywhere (this process and, inherited, every child).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.abspath(__file__)

FULL = dict(
    T=1000,
    dxs=(2, 5),
    dtypes=("float64", "float32"),
    ns=(100, 1000, 4000),
    default_chunk=1024,
    sweep_chunks=(None, 256, 1024),  # at the largest N
    repeats={100: 5, 1000: 3},  # median of; largest N: see repeats_large
    repeats_large=2,  # calls of the best chunk size at the largest N (sweep call included)
    particles_ns=(100, 1000),
    particles_dx=2,
    compare_n=1000,
    case_timeout_s=1800,
    particles_timeout_s=1800,
)
QUICK = dict(
    T=100,
    dxs=(2, 5),
    dtypes=("float64", "float32"),
    ns=(50, 200),
    default_chunk=1024,
    sweep_chunks=(None, 64, 128),
    repeats={50: 3},
    repeats_large=2,
    particles_ns=(50, 200),
    particles_dx=2,
    compare_n=200,
    case_timeout_s=300,
    particles_timeout_s=300,
)
MAX_ATTEMPTS = 2


# ---------------------------------------------------------------------------------------
# model parameters and data (float64, shared by every implementation)
# ---------------------------------------------------------------------------------------
def model_params(dx):
    """dx = 2: the seed's 2-neuron oscillator; dx = 5: its EM initialisation scheme."""
    if dx == 2:
        return dict(
            A=np.array([[1.0, 1.0], [-0.05, 0.98]]),
            C=np.array([[1.0, 0.0]]),
            Q=0.001 * np.eye(2),
            R=0.01 * np.eye(1),
            m0=np.zeros(2),
            P0=0.001 * np.eye(2),
        )
    rng = np.random.default_rng(10 + dx)
    return dict(
        A=np.eye(dx) + 0.1 * rng.standard_normal((dx, dx)),
        C=1.0 + 0.1 * rng.standard_normal((1, dx)),
        Q=0.01 * np.eye(dx),
        R=0.01 * np.eye(1),
        m0=np.zeros(dx),
        P0=0.01 * np.eye(dx),
    )


def make_data(workdir, T, dxs):
    """Simulate y (T, 1) for each dx with ppl_dyn in float64 (in a child) and save .npz."""
    code = (
        "import sys, numpy as np, jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "import jax.numpy as jnp, ppl_dyn\n"
        "from ppl_dyn.models import tanh_rnn\n"
        f"sys.path.insert(0, {os.path.dirname(HERE)!r})\n"
        "from particle_smoother import model_params\n"
        f"T = {T}\n"
        f"for dx in {tuple(dxs)!r}:\n"
        "    p = model_params(dx)\n"
        "    sim = ppl_dyn.simulate(jax.random.key(dx), tanh_rnn,\n"
        "        {k: jnp.asarray(v) for k, v in p.items()}, num_steps=T, state_dim=dx,\n"
        "        obs_dim=1, bias=False)\n"
        f"    np.savez({workdir!r} + f'/data_dx{{dx}}.npz', y=np.asarray(sim['y']),\n"
        "        x=np.asarray(sim['x']), **p)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def load_data(workdir, dx):
    d = np.load(os.path.join(workdir, f"data_dx{dx}.npz"))
    params = {k: d[k] for k in ("A", "C", "Q", "R", "m0", "P0")}
    return params, d["y"]


# ---------------------------------------------------------------------------------------
# child: ours (one precision, one dx, one N, one or several chunk sizes)
# ---------------------------------------------------------------------------------------
def _setup_jax(dtype):
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")
    import ppl_dyn

    ppl_dyn.keep_freed_memory()  # what the CLI does: large freed blocks stay mapped
    return jax


def worker_ours(a):
    jax = _setup_jax(a.dtype)
    import jax.numpy as jnp

    from ppl_dyn.infer import LinearGaussianMStep, ParticleSmoother
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    dt = jnp.float64 if a.dtype == "float64" else jnp.float32
    params_np, y_np = load_data(a.workdir, a.dx)
    params = {k: jnp.asarray(v, dt) for k, v in params_np.items()}
    y = jnp.asarray(y_np, dt)
    key = jax.random.key(1234)
    dx, N = a.dx, a.n
    chunks = [None if c == "none" else int(c) for c in a.chunks.split(",")]

    def make(chunk):
        def estep(params, y, key):
            ss, spec = bind(tanh_rnn, params, y=y, state_dim=dx, bias=False)
            post = ParticleSmoother(num_particles=N, chunk_size=chunk).posterior(
                key, ss, spec.y, spec.u
            )
            stats = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)
            return stats, post.log_marginal

        t0 = time.perf_counter()
        f = jax.jit(estep).lower(params, y, key).compile()
        return f, time.perf_counter() - t0

    def call(f):
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(params, y, key))
        return time.perf_counter() - t0, out

    res = {"chunks": {}}
    compiled = {}
    outs = {}
    for c in chunks:
        f, ct = make(c)
        compiled[c] = f
        times = []
        if not a.no_warmup:
            call(f)
        for _ in range(a.repeats if len(chunks) == 1 else 1):
            t, outs[c] = call(f)
            times.append(t)
        res["chunks"][str(c)] = {"compile_s": ct, "times_s": times}
    best = min(chunks, key=lambda c: min(res["chunks"][str(c)]["times_s"]))
    if len(chunks) > 1:
        for _ in range(a.repeats - 1):
            t, outs[best] = call(compiled[best])
            res["chunks"][str(best)]["times_s"].append(t)
    stats, logZ = outs[best]
    res["best_chunk"] = str(best)
    res["times_s"] = res["chunks"][str(best)]["times_s"]
    res["median_s"] = statistics.median(res["times_s"])
    res["log_marginal"] = float(np.asarray(logZ)[0])
    # sum_t E[x_t tanh(x_{t-1})^T | y] (the pair moment), for a cross-check
    res["pair_moment"] = np.asarray(stats.dynamics.S_zr)[:, :dx].tolist()
    res["device"] = str(jax.devices()[0])
    res["jax_version"] = jax.__version__
    json.dump(res, sys.stdout)


# ---------------------------------------------------------------------------------------
# child: machine throughput (one precision)
# ---------------------------------------------------------------------------------------
def worker_throughput(a):
    """Compute throughput, not memory bandwidth: cache-sized operands, many dispatches
    issued back to back (one block at the end), best of several sizes and of one or two
    dispatching threads."""
    import threading

    jax = _setup_jax(a.dtype)
    import jax.numpy as jnp

    dt = jnp.float64 if a.dtype == "float64" else jnp.float32

    def rate(fn, make_args, work, reps):
        """Work units/s: best of 3 timings, one thread and two concurrent threads."""
        args = [make_args(jax.random.key(i)) for i in range(2)]
        for ar in args:
            jax.block_until_ready(fn(*ar))

        def loop(ar):
            for _ in range(reps):
                out = fn(*ar)
            jax.block_until_ready(out)

        single, conc = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            loop(args[0])
            single.append(time.perf_counter() - t0)
            th = [threading.Thread(target=loop, args=(ar,)) for ar in args]
            t0 = time.perf_counter()
            for h in th:
                h.start()
            for h in th:
                h.join()
            conc.append(time.perf_counter() - t0)
        return {"single": reps * work / min(single), "two_threads": 2 * reps * work / min(conc)}

    exp_f = jax.jit(jnp.exp)
    exp_detail = {}
    for lg in (16, 18, 20):
        n_exp = 1 << lg
        exp_detail[f"2^{lg}"] = rate(
            exp_f,
            lambda k, n=n_exp: (jax.random.normal(k, (n,), dt),),
            n_exp,
            (1 << (22 if a.quick else 25)) >> lg,
        )
    # exp fused into a reduction inside one program (as in the E-step): no output array
    # written, no dispatch per call; the array calls above can read 1.5x lower when the
    # machine is busy, and a bound from them alone was once beaten by our own E-step
    fused_detail = {}
    for rows in (64, 256, 1024):
        n_blk = rows * 1024
        reps = max(1, (1 << (23 if a.quick else 27)) // n_blk)

        def fused(x, reps=reps):
            def body(c, i):
                return c + jnp.sum(jnp.exp(x - i.astype(x.dtype) * 1e-3), axis=1), None

            return jax.lax.scan(body, jnp.zeros(x.shape[0], x.dtype), jnp.arange(reps))[0]

        fused_detail[f"{rows}x1024"] = rate(
            jax.jit(fused),
            lambda k, r=rows: (-5.0 * jnp.abs(jax.random.normal(k, (r, 1024), dt)),),
            n_blk * reps,
            1,
        )
    mm_f = jax.jit(jnp.matmul)
    mm_detail = {}
    for n in (512, 1024) if a.quick else (1024, 2048):
        mm_detail[str(n)] = rate(
            mm_f,
            lambda k, n=n: (jax.random.normal(k, (n, n), dt), jax.random.normal(k, (n, n), dt) + 1),
            2.0 * n**3,
            2 if a.quick else 4,
        )
    json.dump(
        {
            "exp_per_s": max(
                max(v.values()) for v in (*exp_detail.values(), *fused_detail.values())
            ),
            "flop_per_s": max(max(v.values()) for v in mm_detail.values()),
            "exp_detail": exp_detail,
            "exp_fused_detail": fused_detail,
            "matmul_detail": mm_detail,
        },
        sys.stdout,
    )


# ---------------------------------------------------------------------------------------
# child: the `particles` library (float64 numpy)
# ---------------------------------------------------------------------------------------
def particles_tanh_rnn(params):
    """The noisy tanh-RNN as a ``particles`` state-space model (dy = 1):
    x_0 ~ N(m0, P0); x_t ~ N(A tanh(x_{t-1}), Q); y_t ~ N(C tanh(x_t), R)."""
    from particles import distributions as dists
    from particles import state_space_models as ssms

    sdR = float(np.sqrt(params["R"][0, 0]))

    class TanhRNN(ssms.StateSpaceModel):
        def PX0(self):
            return dists.MvNormal(loc=self.m0, cov=self.P0)

        def PX(self, t, xp):
            return dists.MvNormal(loc=np.tanh(xp) @ self.A.T, cov=self.Q)

        def PY(self, t, xp, x):
            return dists.Normal(loc=np.tanh(x) @ self.C[0], scale=sdR)

    return TanhRNN(**params)


def worker_particles(a):
    import particles
    from particles import state_space_models as ssms

    params, y = load_data(a.workdir, a.dx)
    model = particles_tanh_rnn(params)
    data = [np.asarray(yt, dtype=np.float64) for yt in y[:, 0]]
    np.random.seed(1234)
    fk = ssms.Bootstrap(ssm=model, data=data)
    pf = particles.SMC(fk=fk, N=a.n, store_history=True, resampling="systematic", ESSrmin=0.5)
    t0 = time.perf_counter()
    pf.run()
    t1 = time.perf_counter()
    paths = pf.hist.backward_sampling_ON2(a.n)  # list over t of (M, dx)
    t2 = time.perf_counter()
    Z = np.stack(paths, 1)  # (M, T, dx)
    F = np.tanh(Z)
    pair = np.einsum("mti,mtj->ij", Z[:, 1:], F[:, :-1]) / Z.shape[0]
    Eff = np.einsum("mti,mtj->ij", F[:, :-1], F[:, :-1]) / Z.shape[0]
    Exx = np.einsum("mti,mtj->ij", Z[:, 1:], Z[:, 1:]) / Z.shape[0]
    t3 = time.perf_counter()
    json.dump(
        {
            "filter_s": t1 - t0,
            "backward_s": t2 - t1,
            "stats_s": t3 - t2,
            "total_s": t3 - t0,
            "log_marginal": float(pf.summaries.logLts[-1]),
            "pair_moment": pair.tolist(),
            "Eff": Eff.tolist(),
            "Exx": Exx.tolist(),
            "particles_version": getattr(particles, "__version__", "?"),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        sys.stdout,
    )


# ---------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------
def run_child(args, timeout, label):
    for attempt in range(1, MAX_ATTEMPTS + 1):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                [sys.executable, HERE, *args], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            print(f"  [{label}] attempt {attempt} timed out after {timeout} s", flush=True)
            continue
        if p.returncode != 0:
            print(f"  [{label}] attempt {attempt} failed:\n{p.stderr[-3000:]}", flush=True)
            continue
        out = json.loads(p.stdout.strip().splitlines()[-1])
        out["attempts"] = attempt
        out["child_wall_s"] = time.perf_counter() - t0
        return out
    return None


def bound_seconds(T, N, dx, tp):
    P = (T - 1) * N * N
    k = dx
    exps = P
    flops = P * (2 * dx + 2 * k)
    te = exps / tp["exp_per_s"]
    tf = flops / tp["flop_per_s"]
    return {
        "exps": exps,
        "flops": flops,
        "exp_s": te,
        "flop_s": tf,
        "sum_s": te + tf,
        "max_s": max(te, tf),
    }


def fmt_s(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized run")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--skip-particles", action="store_true")
    ap.add_argument("--worker", choices=["ours", "throughput", "particles"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    ap.add_argument("--dx", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", default="1024", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return {
            "ours": worker_ours,
            "throughput": worker_throughput,
            "particles": worker_particles,
        }[a.worker](a)

    cfg = QUICK if a.quick else FULL
    T = cfg["T"]
    n_large = max(cfg["ns"])
    results = {
        "config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "repeats"
        },
        "repeats": {str(k): v for k, v in cfg["repeats"].items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "ours": [],
        "particles": [],
        "throughput": {},
        "bound": [],
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:
        print("simulating data ...", flush=True)
        make_data(wd, T, cfg["dxs"])
        common = ["--workdir", wd]
        if a.quick:
            common.append("--quick")

        for dtype in cfg["dtypes"]:
            print(f"throughput {dtype} ...", flush=True)
            tp = run_child(
                ["--worker", "throughput", "--dtype", dtype, *common], 600, f"throughput {dtype}"
            )
            results["throughput"][dtype] = tp

        for dtype in cfg["dtypes"]:
            for dx in cfg["dxs"]:
                for N in cfg["ns"]:
                    large = N == n_large
                    chunks = cfg["sweep_chunks"] if large else (cfg["default_chunk"],)
                    reps = cfg["repeats_large"] if large else cfg["repeats"].get(N, 3)
                    label = f"ours {dtype} dx={dx} N={N}"
                    print(f"{label} chunks={chunks} ...", flush=True)
                    args = [
                        "--worker",
                        "ours",
                        "--dtype",
                        dtype,
                        "--dx",
                        str(dx),
                        "--n",
                        str(N),
                        "--chunks",
                        ",".join("none" if c is None else str(c) for c in chunks),
                        "--repeats",
                        str(reps),
                        *common,
                    ]
                    if large:
                        args.append("--no-warmup")
                    r = run_child(args, cfg["case_timeout_s"], label)
                    row = {"dtype": dtype, "dx": dx, "N": N, "T": T, **(r or {"failed": True})}
                    results["ours"].append(row)
                    if r:
                        print(
                            f"  median {r['median_s']:.4g} s (chunk {r['best_chunk']}), "
                            f"log p(y) ~ {r['log_marginal']:.2f}",
                            flush=True,
                        )

        if not a.skip_particles:
            for N in cfg["particles_ns"]:
                label = f"particles dx={cfg['particles_dx']} N={N}"
                print(f"{label} ...", flush=True)
                r = run_child(
                    [
                        "--worker",
                        "particles",
                        "--dx",
                        str(cfg["particles_dx"]),
                        "--n",
                        str(N),
                        *common,
                    ],
                    cfg["particles_timeout_s"],
                    label,
                )
                results["particles"].append(
                    {"dx": cfg["particles_dx"], "N": N, "T": T, **(r or {"failed": True})}
                )
                if r:
                    print(
                        f"  total {r['total_s']:.4g} s (filter {r['filter_s']:.3g} s, "
                        f"backward {r['backward_s']:.4g} s)",
                        flush=True,
                    )

    # bound and ratios
    for dtype in cfg["dtypes"]:
        tp = results["throughput"].get(dtype)
        if not tp:
            continue
        for dx in cfg["dxs"]:
            b = bound_seconds(T, n_large, dx, tp)
            ours = next(
                (
                    r
                    for r in results["ours"]
                    if r["dtype"] == dtype
                    and r["dx"] == dx
                    and r["N"] == n_large
                    and "median_s" in r
                ),
                None,
            )
            b.update(
                dtype=dtype,
                dx=dx,
                N=n_large,
                T=T,
                ours_s=ours["median_s"] if ours else None,
                ratio_ours_over_bound=ours["median_s"] / b["sum_s"] if ours else None,
                ratio_ours_over_max_bound=ours["median_s"] / b["max_s"] if ours else None,
            )
            results["bound"].append(b)
    ours_cmp = next(
        (
            r
            for r in results["ours"]
            if r["dtype"] == "float64"
            and r["dx"] == cfg["particles_dx"]
            and r["N"] == cfg["compare_n"]
            and "median_s" in r
        ),
        None,
    )
    part_cmp = next(
        (r for r in results["particles"] if r["N"] == cfg["compare_n"] and "total_s" in r), None
    )
    results["ratio_particles_over_ours"] = (
        part_cmp["total_s"] / ours_cmp["median_s"] if ours_cmp and part_cmp else None
    )
    results["ratio_particles_backward_over_ours"] = (
        part_cmp["backward_s"] / ours_cmp["median_s"] if ours_cmp and part_cmp else None
    )
    results["total_wall_s"] = time.perf_counter() - t_start

    # report
    lines = [
        "",
        f"## Particle E-step, tanh-RNN, T = {T}, dy = 1 (wall-clock seconds per E-step)",
        "",
        "| implementation | dtype | dx | N | chunk | median s | runs | log p(y) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["ours"]:
        if "median_s" not in r:
            lines.append(f"| ppl_dyn | {r['dtype']} | {r['dx']} | {r['N']} | - | FAILED | | |")
            continue
        sweep = ""
        if len(r["chunks"]) > 1:
            sweep = (
                " ("
                + ", ".join(f"{c}: {min(v['times_s']):.3g}" for c, v in r["chunks"].items())
                + ")"
            )
        lines.append(
            f"| ppl_dyn | {r['dtype']} | {r['dx']} | {r['N']} | {r['best_chunk']}{sweep}"
            f" | {fmt_s(r['median_s'])} | {len(r['times_s'])} | {r['log_marginal']:.2f} |"
        )
    for r in results["particles"]:
        if "total_s" not in r:
            lines.append(f"| particles | float64 | {r['dx']} | {r['N']} | - | FAILED | | |")
            continue
        lines.append(
            f"| particles (SMC + backward_sampling_ON2; filter {fmt_s(r['filter_s'])}"
            f" + backward {fmt_s(r['backward_s'])}) | float64 | {r['dx']} | {r['N']} |"
            f" - | {fmt_s(r['total_s'])} | 1 | {r['log_marginal']:.2f} |"
        )
    if not a.skip_particles:
        lines.append(
            f"| particles | float64 | {cfg['particles_dx']} | {n_large} | - | skipped "
            "(~16x the N=1000 time) | | |"
        )
    lines += [
        "",
        "## Lower bound for the FFBSm backward pass (measured throughput)",
        "",
        "| dtype | exp/s | matmul flop/s | dx | N | exps | flops | exp s | flop s |"
        " bound (sum) s | ours s | ours / bound | ours / max-bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["bound"]:
        tp = results["throughput"][b["dtype"]]
        rb = b["ratio_ours_over_bound"]
        rm = b["ratio_ours_over_max_bound"]
        lines.append(
            f"| {b['dtype']} | {tp['exp_per_s']:.3g} | {tp['flop_per_s']:.3g} | {b['dx']} |"
            f" {b['N']} | {b['exps']:.3g} | {b['flops']:.3g} | {fmt_s(b['exp_s'])} |"
            f" {fmt_s(b['flop_s'])} | {fmt_s(b['sum_s'])} | {fmt_s(b['ours_s'])} |"
            f" {'-' if rb is None else f'{rb:.2f}x'} | {'-' if rm is None else f'{rm:.2f}x'} |"
        )
    lines += ["", "## Ratios", ""]
    rp = results["ratio_particles_over_ours"]
    lines.append(
        f"* particles / ours at N = {cfg['compare_n']} (dx = {cfg['particles_dx']}, "
        f"float64, whole E-step): "
        + (
            "n/a"
            if rp is None
            else f"**{rp:.0f}x** (target >= 100x; backward pass "
            f"alone: {results['ratio_particles_backward_over_ours']:.0f}x)"
        )
    )
    for b in results["bound"]:
        rb = b["ratio_ours_over_bound"]
        lines.append(
            f"* ours / bound at N = {b['N']}, dx = {b['dx']}, {b['dtype']}: "
            + ("n/a" if rb is None else f"**{rb:.2f}x** (target <= 3x)")
        )
    if ours_cmp and part_cmp:
        lines.append(
            f"* cross-check at N = {cfg['compare_n']}: log p(y) ours "
            f"{ours_cmp['log_marginal']:.2f}, particles {part_cmp['log_marginal']:.2f};"
            f" pair moment sum_t E[x_t tanh(x_(t-1))^T]: ours "
            f"{np.round(ours_cmp['pair_moment'], 2).tolist()}, particles "
            f"{np.round(part_cmp['pair_moment'], 2).tolist()}"
        )
    lines.append(f"* total wall time {results['total_wall_s']:.0f} s")
    print("\n".join(lines), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
