"""Benchmark: particle smoothers for EM statistics -- cost against N and accuracy per second.

Run from the repository root::

    python benchmarks/smoothers.py [--quick] [--out results.json] [--dx 2] [--T 1000]

Pure JAX: it runs on a GPU when JAX sees one (``jax.devices()`` is printed). ``--quick``
is a smoke-sized run (T = 100, N <= 300, under a minute plus compilation).

What is measured, on one simulated LDS (``dx`` states, one observation, T = 1000, a
random stable ``A``), in float64, one jitted E-step each (filter + smoother + the
expected sufficient statistics of the closed-form M-step, i.e. what one EM iteration
costs before its M-step); compilation is excluded and the time is the median of
``--repeats`` calls:

* ``ffbsm``: ``ParticleSmoother(N, mode="ffbsm")``, O(N^2) per step. On CPU it is capped
  at ``N <= --ffbsm-max`` (default 3000): above that one pass takes minutes.
* ``ffbsi-mcmc``: ``ParticleSmoother(N, mode="ffbsi-mcmc", num_trajectories=N)``, one
  independent-MH move per backward step; O(N) per step.
* ``ffbsi-hybrid``: ``ParticleSmoother(N, mode="ffbsi-hybrid", num_trajectories=N)``,
  rejection with at most 10 rounds, then the exact O(N) draw; O(N) per step when the
  acceptance rate is not small.
* ``paris`` / ``paris-hybrid``: ``PARISSmoother(N, num_backward=2, kernel="mcmc" /
  "hybrid")`` from ``ppl_dyn.infer.paris`` when that module is present (forward-only,
  O(N K) per step, memory independent of T).
* ``cpf-as``: one conditional particle filter sweep with ancestor sampling
  (``ppl_dyn.infer.cpf``), conditional on a fixed reference path, and the statistics of
  its weighted ancestral paths: one PSAEM iteration before its averaging, O(N) per step.
  Timed only (no accuracy row): a sweep is one move of a Markov chain, not an estimator
  of the smoothing statistics on its own.
* Further rows can be added in ``available_methods`` (a name and a function building the
  jitted ``(rng_key) -> LinearStats`` E-step).

Timing: per-pass seconds against N (``N = 1e2 .. 1e5``; ``--quick``: 100, 300), and
the log-log slope of time against N over ``N >= 1000`` (over all N with ``--quick``).

Accuracy: the exact EM statistics come from the Kalman smoother (the model is linear
Gaussian). For each method and each N in the accuracy grid, ``--reps`` independent
reruns give the mean squared error of the dynamics statistics
``(S_zr, S_rr, S_zz) / (T - 1)`` (sum over entries; it includes the O(1/N) bias, which is
negligible next to the variance here). ``work = MSE * seconds per pass`` is the cost of
one unit of precision: for a method at the Monte Carlo rate with linear cost it does not
depend on N; for FFBSm it grows like N.

The target comparison ("at N = 1e4 a linear-cost smoother is >= 20x faster than FFBSm at
equal Monte Carlo error of the EM statistics"): equal error means the MSE that FFBSm has at
N = 1e4. When FFBSm at 1e4 is not run (CPU cap), its time is extrapolated from the largest
N measured with the O(N^2) law applied to the part above the fixed cost
(``t(N) = t_0 + (t(N_max) - t_0) (N / N_max)^2``, ``t_0`` the time at the smallest N; on a
GPU, where small N is latency-bound, measure FFBSm at 1e4 directly: ``--ffbsm-max``)
and its MSE from the 1/N law fitted on the accuracy grid (``MSE(N) = c / N``). A
linear-cost method reaches that MSE with
``N* = c_method / MSE_target`` particles and takes ``t_method(N*)`` from its measured times
(log-log interpolation, linear extrapolation beyond the grid). The speed-up is
``t_ffbsm(1e4) / t_method(N*)``. Equivalently, compare ``work``: at equal error the time
ratio is the ratio of ``work`` values.

Timings are wall-clock on whatever machine runs it; a concurrently loaded CPU inflates
them (the 2-core development machine is shared: its numbers are noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ppl_dyn.infer import KalmanSmoother, LinearGaussianMStep, ParticleSmoother  # noqa: E402
from ppl_dyn.infer.backward import ffbsi_hybrid, ffbsi_mcmc  # noqa: E402
from ppl_dyn.infer.particle import particle_filter  # noqa: E402
from ppl_dyn.models import lds  # noqa: E402
from ppl_dyn.state_space import bind  # noqa: E402


def make_system(dx: int, T: int, seed: int = 0):
    """A random stable LDS (spectral radius 0.9) with one observation, and data."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dx, dx))
    A *= 0.9 / np.max(np.abs(np.linalg.eigvals(A)))
    params = dict(
        A=A,
        b=0.1 * rng.normal(size=dx),
        C=rng.normal(size=(1, dx)),
        d=np.array([0.2]),
        Q=0.3 * np.eye(dx),
        R=np.array([[0.5]]),
        m0=np.zeros(dx),
        P0=np.eye(dx),
    )
    x = np.zeros((T, dx))
    x[0] = rng.multivariate_normal(params["m0"], params["P0"])
    for t in range(1, T):
        x[t] = A @ x[t - 1] + params["b"] + rng.multivariate_normal(np.zeros(dx), params["Q"])
    y = x @ params["C"].T + params["d"] + rng.normal(size=(T, 1)) * np.sqrt(0.5)
    return params, y


def dyn_vector(stats, T):
    d = stats.dynamics
    return jnp.concatenate([d.S_zr.ravel(), d.S_rr.ravel(), d.S_zz.ravel()]) / (T - 1)


def particle_method(mode):
    def build(ss, spec, N):
        e = ParticleSmoother(N, mode=mode, num_trajectories=N, chunk_size=1024)
        ms = LinearGaussianMStep()

        @jax.jit
        def run(key):
            post = e.posterior(key, ss, spec.y, spec.u)
            return ms.statistics(post, ss, spec.y, spec.u)

        return run

    return build


def paris_method(kernel):
    def build(ss, spec, N):
        from ppl_dyn.infer.paris import PARISSmoother, paris_linear_statistics

        e = PARISSmoother(N, num_backward=2, kernel=kernel)

        @jax.jit
        def run(key):
            return paris_linear_statistics(e.posterior(key, ss, spec.y, spec.u))

        return run

    return build


def cpf_method():
    """One CPF-AS sweep (ancestor sampling, conditional on a reference path) and the
    statistics of its weighted ancestral paths: what one PSAEM iteration costs before
    its averaging and M-step. Timed only: a sweep is one step of a Markov chain whose
    error depends on the reference it is given, not an estimator on its own."""

    def build(ss, spec, N):
        from ppl_dyn.infer.cpf import conditional_particle_filter, path_posterior

        ms = LinearGaussianMStep()
        feature = ss.structure.dynamics.features
        kal = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
        ref = kal.means[0]  # a plausible reference path (the smoothed means)

        @jax.jit
        def run(key):
            out = conditional_particle_filter(key, ss, spec.y[0], spec.u[0], ref, N)
            post = jax.tree_util.tree_map(lambda a: a[None], path_posterior(out, feature))
            return ms.statistics(post, ss, spec.y, spec.u)

        return run

    return build


TIMING_ONLY = ("cpf-as",)


def available_methods():
    methods = {
        "ffbsm": particle_method("ffbsm"),
        "ffbsi-mcmc": particle_method("ffbsi-mcmc"),
        "ffbsi-hybrid": particle_method("ffbsi-hybrid"),
    }
    try:  # optional rows: modules written separately
        import ppl_dyn.infer.paris  # noqa: F401

        methods["paris"] = paris_method("mcmc")
        methods["paris-hybrid"] = paris_method("hybrid")
    except ImportError:
        pass
    methods["cpf-as"] = cpf_method()
    return methods


def time_pass(fn, repeats):
    out = fn(jax.random.key(0))
    jax.block_until_ready(out)  # compile + one warm-up call
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(r + 1)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loglog_slope(ns, ts, min_n):
    pts = [(n, t) for n, t in zip(ns, ts, strict=True) if n >= min_n and t is not None]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def interp_time(ns, ts, n):
    """Time at ``n`` by log-log interpolation (linear extrapolation of the end pieces)."""
    pts = sorted((a, b) for a, b in zip(ns, ts, strict=True) if b is not None)
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    if len(x) == 1:
        return float(np.exp(y[0]) * n / pts[0][0])
    i = int(np.clip(np.searchsorted(x, np.log(n)) - 1, 0, len(x) - 2))
    s = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    return float(np.exp(y[i] + s * (np.log(n) - x[i])))


def main(argv=None):
    import ppl_dyn

    ppl_dyn.keep_freed_memory()  # what the CLI does: large freed blocks stay mapped
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--dx", type=int, default=2)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="reruns for the accuracy study")
    p.add_argument("--ffbsm-max", type=int, default=None)
    p.add_argument("--max-n", type=int, default=100_000)
    p.add_argument(
        "--hybrid-max", type=int, default=None,
        help="largest N for ffbsi-hybrid (its exact fallback is O(N) per failed row)",
    )  # fmt: skip
    p.add_argument("--methods", default=None, help="comma-separated subset")
    a = p.parse_args(argv)

    print("jax.devices():", jax.devices(), flush=True)
    gpu = jax.default_backend() != "cpu"
    if a.quick:
        T, grid, acc_grid, reps, repeats = a.T or 100, [100, 300], [100, 300], a.reps or 8, 2
        ffbsm_max = a.ffbsm_max or 300
    else:
        T = a.T or 1000
        grid = [n for n in (100, 300, 1000, 3000, 10_000, 30_000, 100_000) if n <= a.max_n]
        acc_grid = [300, 1000, 3000]
        reps, repeats = a.reps or 16, a.repeats or 3
        ffbsm_max = a.ffbsm_max or (10_000 if gpu else 3000)
    repeats = a.repeats or repeats
    hyb_max = a.hybrid_max or max(grid)
    params, y = make_system(a.dx, T)
    ss, spec = bind(lds, params, y=y, state_dim=a.dx)
    methods = available_methods()
    if a.methods:
        methods = {k: v for k, v in methods.items() if k in a.methods.split(",")}

    # exact statistics (Kalman)
    kal = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
    exact = np.asarray(dyn_vector(LinearGaussianMStep().statistics(kal, ss, spec.y, spec.u), T))

    res = dict(
        device=str(jax.devices()[0]), T=T, dx=a.dx, grid=grid, acc_grid=acc_grid, reps=reps,
        ffbsm_max=ffbsm_max, times={}, slopes={}, accuracy={}, target={},
    )  # fmt: skip
    print(f"T = {T}, dx = {a.dx}, methods: {list(methods)}", flush=True)

    built = {}

    def get(name, n):  # one compilation per (method, N)
        if (name, n) not in built:
            built[name, n] = methods[name](ss, spec, n)
        return built[name, n]

    # ---- backward-kernel diagnostics at one N ----------------------------------------
    n_diag = grid[min(2, len(grid) - 1)]
    filt = particle_filter(jax.random.key(7), ss, spec.y[0], spec.u[0], n_diag)
    for name, fn in (("ffbsi-mcmc", ffbsi_mcmc), ("ffbsi-hybrid", ffbsi_hybrid)):
        info = jax.jit(lambda k, fn=fn: fn(k, ss, filt, spec.u[0], n_diag))(jax.random.key(8)).info
        acc = float(jnp.mean(info.acceptance_rate))
        fb = float(jnp.sum(info.num_fallback)) / (n_diag * (T - 1))
        res.setdefault("diagnostics", {})[name] = dict(
            N=n_diag, mean_acceptance_rate=acc, fallback_fraction=fb
        )
        print(f"  {name:13s} N = M = {n_diag}: acceptance {acc:.3f}, fallback rows {fb:.3f}")

    # ---- time per pass against N ---------------------------------------------------
    for name in methods:
        ts = []
        for n in grid:
            if (name == "ffbsm" and n > ffbsm_max) or (name == "ffbsi-hybrid" and n > hyb_max):
                ts.append(None)
                continue
            t = time_pass(get(name, n), repeats)
            ts.append(t)
            print(f"  {name:13s} N = {n:6d}: {t:8.3f} s/pass", flush=True)
        res["times"][name] = ts
        res["slopes"][name] = loglog_slope(grid, ts, 100 if a.quick else 1000)
    print("log-log slopes of time vs N:", {k: v and round(v, 2) for k, v in res["slopes"].items()})

    # ---- accuracy of the EM statistics against Kalman ---------------------------------
    for name in methods:
        if name in TIMING_ONLY:
            continue
        rows = []
        for n in acc_grid:
            if name == "ffbsm" and n > ffbsm_max:
                continue
            fn = get(name, n)
            vecs = np.stack(
                [np.asarray(dyn_vector(fn(jax.random.key(1000 + r)), T)) for r in range(reps)]
            )
            mse = float(np.mean(np.sum((vecs - exact) ** 2, -1)))
            se = float(np.std(np.sum((vecs - exact) ** 2, -1), ddof=1) / np.sqrt(reps))
            t = interp_time(grid, res["times"][name], n)
            rows.append(dict(N=n, mse=mse, mse_se=se, seconds=t, work=mse * t))
            print(
                f"  {name:13s} N = {n:6d}: MSE {mse:.3e} (+- {se:.1e}), "
                f"work = MSE x s = {mse * t:.3e}",
                flush=True,
            )
        res["accuracy"][name] = rows

    # ---- target: at N = 1e4, linear cost vs FFBSm at equal error ---------------------
    def c_of(name):  # MSE = c / N fitted over the accuracy grid
        rows = res["accuracy"].get(name) or []
        return float(np.mean([r["mse"] * r["N"] for r in rows])) if rows else None

    if "ffbsm" in methods and res["accuracy"].get("ffbsm"):
        n_ref = 10_000
        ts_f = res["times"]["ffbsm"]
        measured = [(n, t) for n, t in zip(grid, ts_f, strict=True) if t is not None]
        n_max, t_max = measured[-1]
        t_0 = measured[0][1]  # fixed cost (dispatch / scan latency) at the smallest N
        if n_max < n_ref:
            t_ffbsm = t_0 + max(t_max - t_0, 0.0) * (n_ref / n_max) ** 2
        else:
            t_ffbsm = interp_time(grid, ts_f, n_ref)
        mse_target = c_of("ffbsm") / n_ref
        res["target"]["ffbsm"] = dict(
            N=n_ref, seconds=t_ffbsm, mse=mse_target, extrapolated=n_max < n_ref
        )
        print(
            f"FFBSm at N = {n_ref}: {t_ffbsm:.2f} s/pass"
            f"{' (extrapolated, O(N^2) from N = %d)' % n_max if n_max < n_ref else ''}, "
            f"MSE {mse_target:.3e}"
        )
        for name in methods:
            if name == "ffbsm" or not res["accuracy"].get(name):
                continue
            n_star = c_of(name) / mse_target
            t_star = interp_time(grid, res["times"][name], n_star)
            speed = t_ffbsm / t_star
            res["target"][name] = dict(N_star=n_star, seconds=t_star, speedup=speed)
            print(
                f"  {name:13s} needs N* = {n_star:8.0f} for that MSE: {t_star:.3f} s/pass, "
                f"{speed:.1f}x faster than FFBSm (target >= 20x)"
            )

    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)
    return res


if __name__ == "__main__":
    main()
