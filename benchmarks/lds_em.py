"""Benchmark: EM for a linear dynamical system -- ppl_dyn vs dynamax vs pykalman.

Run from the repository root::

    python benchmarks/lds_em.py [--quick] [--out results.json]

It needs the ``bench`` extra (dynamax and pykalman): ``pip install -e .[bench]``.
``--quick`` runs two smoke-sized cases (short sequences, 10 iterations) in 1-2 minutes
(mostly the fresh-process whole fits); the full run takes about 10 minutes on a 2-core
CPU when nothing deadlocks (see the jaxlib note below the docstring: a hung case is
killed after ``case_timeout_s`` and retried, then reported as NO RESULT). Close other
CPU-heavy processes first: timings are wall-clock medians.

What is measured (float64, CPU unless JAX picks another backend), on the same data and
from the same initial parameters for every library:

* **per-iteration time** (compile excluded, median of repeats):
    - ours: one call of the jitted EM step ``EM._compiled(...)`` (E-step + M-step, one
      dispatch), blocked until ready;
    - dynamax: its own ``fit_em`` loop body (``vmap(e_step)`` + ``m_step`` inside
      ``lax.scan``, copied from ``SSM.fit_em``) jitted once here, so compilation can be
      excluded; time of a ``num_iters``-step scan divided by ``num_iters``. As a
      cross-check, ``(t(fit_em, K+1 iters) - t(fit_em, 1 iter)) / K`` is reported too
      (``fit_em`` recompiles on every call, so both terms include a compile);
    - pykalman: ``KalmanFilter.em(X, n_iter=k)`` time divided by ``k``.
* **whole fit** of 100 iterations, compile included: ``EM.run`` and dynamax ``fit_em``,
  each in a fresh Python process (timer starts after imports and data loading). Two
  more settings of the same fit: a **second fit in the same process** on new data of
  the same shapes (a restart, a fold, a bootstrap sample: ours reuses its compiled step,
  dynamax's ``fit_em`` compiles again on every call), and a **fresh process with a warm
  JAX persistent compilation cache** (``JAX_COMPILATION_CACHE_DIR``, filled by one
  earlier run) for both libraries.
* **final log-likelihood** after 100 iterations (``log p(y | theta_99)``, i.e. the
  value each method reports for its last iteration) as a sanity check that the models
  match. pykalman's M-step is coordinate-wise (ECM: offsets and matrices are updated
  separately), so its path differs slightly; for the 10000-step case pykalman's value is
  skipped (too slow). For the batch case dynamax's ``LinearGaussianSSM`` EM diverges
  (its initial-covariance M-step is wrong for several sequences), so
  ``LinearGaussianConjugateSSM`` (MAP EM with weak conjugate priors; its reported value
  includes the log prior) is timed instead.

Model: x_1 ~ N(m0, P0); x_t = A x_{t-1} + b + N(0, Q); y_t = C x_t + d + N(0, R), all of
A, b, Q, C, d, R, m0, P0 estimated. Targets (from the issue): per-iteration no slower
than dynamax on every case, whole fit at most half of dynamax's, >= 50x faster than
pykalman per iteration.
"""

import os

# jaxlib 0.10.2 on a 2-core CPU intermittently deadlocks inside ppl_dyn's EM step (a
# batched LU from ``jnp.linalg.solve``: the main thread waits in block_until_ready while a
# tf_XLAEigen worker waits forever in jaxlib's ParallelBatchMap -> BlockingCounter::Wait;
# --xla_cpu_multi_thread_eigen=false does not help). Every case therefore runs in a child
# process with a time limit and is retried; hangs are counted in the results.
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

NUM_FIT_ITERS = 100
MAX_ATTEMPTS = 3

FULL_CASES = [
    # name, dx, dy, T, S (None = one sequence)
    ("dx2_dy1_T1000", 2, 1, 1000, None),
    ("dx5_dy10_T1000", 5, 10, 1000, None),
    ("dx5_dy10_T10000", 5, 10, 10000, None),
    ("batch16_dx5_dy10_T1000", 5, 10, 1000, 16),
]
QUICK_CASES = [
    ("dx2_dy1_T200", 2, 1, 200, None),
    ("batch4_dx3_dy4_T100", 3, 4, 100, 4),
]

FULL_SETTINGS = dict(
    fit_iters=NUM_FIT_ITERS,
    ours_repeats=30,  # single-step calls (median)
    dyn_scan_iters=20,  # iterations per timed dynamax scan
    dyn_repeats=5,  # timed dynamax scans (median)
    dyn_fit_em_budget_s=3.0,  # cross-check fit_em(K + 1) - fit_em(1): K * per-iter ~ this
    dyn_fit_em_repeats=3,
    fresh_repeats=1,  # whole fits in fresh processes (per library and case)
    pyk_long_T=1000,  # pykalman runs the full fit (and reports its ll) up to this T
    pyk_short_iters=3,  # otherwise only this many iterations (timing only)
    case_timeout_s=600,  # per attempt; a case takes 1-4 minutes when nothing hangs
    fresh_timeout_s=240,
)
QUICK_SETTINGS = dict(
    fit_iters=10,
    ours_repeats=5,
    dyn_scan_iters=5,
    dyn_repeats=2,
    dyn_fit_em_budget_s=0.2,
    dyn_fit_em_repeats=1,
    fresh_repeats=1,
    pyk_long_T=200,
    pyk_short_iters=2,
    case_timeout_s=300,
    fresh_timeout_s=120,
)


# ---------------------------------------------------------------------------------------
# parameters and data
# ---------------------------------------------------------------------------------------
def true_params(key, dx, dy):
    """Stable, well-conditioned parameters (not prior draws: those can be explosive)."""
    kA, kC, kb, kd = jax.random.split(key, 4)
    Qm, Rm = jnp.linalg.qr(jax.random.normal(kA, (dx, dx)))
    Qm = Qm * jnp.sign(jnp.diagonal(Rm))[None, :]
    A = 0.95 * Qm  # orthogonal times 0.95: spectral radius exactly 0.95
    return dict(
        A=A,
        C=jax.random.normal(kC, (dy, dx)),
        Q=0.1 * jnp.eye(dx),
        R=0.1 * jnp.eye(dy),
        m0=jnp.zeros(dx),
        P0=jnp.eye(dx),
        b=0.1 * jax.random.normal(kb, (dx,)),
        d=jax.random.normal(kd, (dy,)),
    )


def initial_params(key, dx, dy):
    """Common starting point for every library."""
    return dict(
        A=0.9 * jnp.eye(dx),
        C=jax.random.normal(key, (dy, dx)),
        Q=jnp.eye(dx),
        R=jnp.eye(dy),
        m0=jnp.zeros(dx),
        P0=jnp.eye(dx),
        b=jnp.zeros(dx),
        d=jnp.zeros(dy),
    )


def make_case(dx, dy, T, S):
    import ppl_dyn
    from ppl_dyn.models import lds

    theta = true_params(jax.random.key(100 + 10 * dx + dy), dx, dy)
    sim = ppl_dyn.simulate(
        jax.random.key(0), lds, theta, num_steps=T, num_sequences=S, state_dim=dx, obs_dim=dy
    )
    y = np.asarray(sim["y"], dtype=np.float64)
    init = {k: np.asarray(v) for k, v in initial_params(jax.random.key(1), dx, dy).items()}
    return y, init


# ---------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------
def _block(x):
    return jax.block_until_ready(x)


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


# ---------------------------------------------------------------------------------------
# ppl_dyn
# ---------------------------------------------------------------------------------------
def ours_step_time(y, init, dx, repeats):
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.infer._run import validate_data
    from ppl_dyn.models import lds

    em = EM(lds, KalmanSmoother())
    kwargs = validate_data(dict(y=jnp.asarray(y), state_dim=dx))
    step, dynamic = em._compiled(kwargs)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    key = jax.random.key(0)
    t0 = time.perf_counter()
    _block(step(params, dynamic, key, 0))  # compile
    compile_s = time.perf_counter() - t0
    med, ts = median_time(lambda: step(params, dynamic, key, 0), repeats)
    return dict(per_iter_s=med, per_iter_samples_s=ts, first_call_s=compile_s)


def ours_fit(y, init, dx, num_iters):
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds

    em = EM(lds, KalmanSmoother())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = em.run(
            jax.random.key(1),
            num_iters,
            y=y,
            state_dim=dx,
            init_params=init,
            progress_bar=False,
        )
    floors = {k: int(v) for k, v in res.floor_counts.items() if v}
    return float(res.log_marginals[-1]), floors, [str(x.message) for x in w]


# ---------------------------------------------------------------------------------------
# dynamax
# ---------------------------------------------------------------------------------------
def dynamax_model(dx, dy, batched):
    from dynamax.linear_gaussian_ssm import LinearGaussianConjugateSSM, LinearGaussianSSM

    cls = LinearGaussianConjugateSSM if batched else LinearGaussianSSM
    return cls(dx, dy)


def dynamax_params(model, init):
    j = {k: jnp.asarray(v) for k, v in init.items()}
    return model.initialize(
        jax.random.PRNGKey(0),
        initial_mean=j["m0"],
        initial_covariance=j["P0"],
        dynamics_weights=j["A"],
        dynamics_bias=j["b"],
        dynamics_covariance=j["Q"],
        emission_weights=j["C"],
        emission_bias=j["d"],
        emission_covariance=j["R"],
    )


def dynamax_scan_fn(model, props, emissions, num_steps):
    """The body of ``SSM.fit_em`` (dynamax 1.0.3), jitted once so compile is excluded."""
    from dynamax.utils.utils import ensure_array_has_batch_dim

    batch_emissions = ensure_array_has_batch_dim(emissions, model.emission_shape)
    batch_inputs = ensure_array_has_batch_dim(None, model.inputs_shape)

    def em_step(carry, _):
        params, m_step_state = carry
        batch_stats, lls = jax.vmap(partial(model.e_step, params))(batch_emissions, batch_inputs)
        lp = model.log_prior(params) + lls.sum()
        params, m_step_state = model.m_step(params, props, batch_stats, m_step_state)
        return (params, m_step_state), lp

    @jax.jit
    def run(params):
        carry = (params, model.initialize_m_step_state(params, props))
        return jax.lax.scan(em_step, carry, xs=None, length=num_steps)

    return run


def dynamax_step_time(y, init, dx, dy, batched, s):
    model = dynamax_model(dx, dy, batched)
    params, props = dynamax_params(model, init)
    yj = jnp.asarray(y)
    n = s["dyn_scan_iters"]
    run = dynamax_scan_fn(model, props, yj, n)
    t0 = time.perf_counter()
    _block(run(params))
    first = time.perf_counter() - t0
    med, ts = median_time(lambda: run(params), s["dyn_repeats"])
    out = dict(per_iter_s=med / n, per_iter_samples_s=[t / n for t in ts], first_call_s=first)

    # cross-check with the public API: (t(K + 1 iters) - t(1 iter)) / K, after a warm-up
    # K large enough that the K-iteration difference dominates the compile-time noise
    k = int(min(500, max(10, round(s["dyn_fit_em_budget_s"] / out["per_iter_s"]))))
    fit = lambda m: model.fit_em(params, props, yj, num_iters=m, verbose=False)  # noqa: E731
    _block(fit(1))
    t1s, tks = [], []
    for _ in range(s["dyn_fit_em_repeats"]):
        t0 = time.perf_counter()
        _block(fit(1))
        t1s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _block(fit(k + 1))
        tks.append(time.perf_counter() - t0)
    t1, tk = statistics.median(t1s), statistics.median(tks)
    out.update(
        fit_em_1_iter_s=t1,
        fit_em_k_plus_1_iters_s=tk,
        fit_em_k=k,
        per_iter_fit_em_diff_s=(tk - t1) / k,
    )
    return out


def dynamax_fit(y, init, dx, dy, batched, num_iters):
    model = dynamax_model(dx, dy, batched)
    params, props = dynamax_params(model, init)
    fitted, lps = model.fit_em(params, props, jnp.asarray(y), num_iters=num_iters, verbose=False)
    lps = np.asarray(lps)
    return float(lps[-1])


def dynamax_plain_batch_ll(y, init, dx, dy, num_iters):
    """LinearGaussianSSM (no priors) on the batch, to document its divergence."""
    from dynamax.linear_gaussian_ssm import LinearGaussianSSM

    model = LinearGaussianSSM(dx, dy)
    params, props = dynamax_params(model, init)
    _, lps = model.fit_em(params, props, jnp.asarray(y), num_iters=num_iters, verbose=False)
    lps = np.asarray(lps)
    bad = np.flatnonzero(~np.isfinite(lps))
    return float(lps[-1]), (int(bad[0]) if bad.size else None)


# ---------------------------------------------------------------------------------------
# pykalman
# ---------------------------------------------------------------------------------------
def pykalman_em(y, init, n_iter):
    from pykalman import KalmanFilter

    kf = KalmanFilter(
        transition_matrices=init["A"],
        observation_matrices=init["C"],
        transition_covariance=init["Q"],
        observation_covariance=init["R"],
        transition_offsets=init["b"],
        observation_offsets=init["d"],
        initial_state_mean=init["m0"],
        initial_state_covariance=init["P0"],
        em_vars="all",
    )
    t0 = time.perf_counter()
    kf = kf.em(y, n_iter=n_iter)
    elapsed = time.perf_counter() - t0
    return kf, elapsed


# ---------------------------------------------------------------------------------------
# fresh-process whole fits
# ---------------------------------------------------------------------------------------
def other_data(y):
    """New observations of the same shapes (a second fit in the same session: another
    restart, fold or bootstrap sample)."""
    return np.asarray(y) + 0.01 * np.random.default_rng(1).standard_normal(np.shape(y))


def worker(args):
    """Entry point of the child process: one whole fit, compile included, then a second
    whole fit on new data of the same shapes in the same process."""
    data = np.load(args.worker_data)
    y = data["y"]
    init = {k[5:]: data[k] for k in data.files if k.startswith("init_")}
    dx, dy = int(data["dx"]), int(data["dy"])
    batched = y.ndim == 3
    _block(jnp.asarray(y) + 0.0)  # start the backend before the timer
    if args.worker == "ours":
        # import the library before the timer, as for dynamax below
        import ppl_dyn.infer  # noqa: F401
        import ppl_dyn.models  # noqa: F401

        t0 = time.perf_counter()
        ll, floors, warns = ours_fit(y, init, dx, args.worker_iters)
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_fit(other_data(y), init, dx, args.worker_iters)
        second = time.perf_counter() - t0
        out = dict(
            fit_s=elapsed, second_fit_s=second, final_ll=ll, floor_counts=floors, warnings=warns
        )
    elif args.worker == "ours-init":
        # diagnostic: EM.init alone (model inspection, prior draws) in a fresh process
        from ppl_dyn.infer import EM, KalmanSmoother
        from ppl_dyn.models import lds

        t0 = time.perf_counter()
        _block(EM(lds, KalmanSmoother()).init(jax.random.key(1), init, y=y, state_dim=dx))
        out = dict(init_s=time.perf_counter() - t0)
    else:
        import dynamax.linear_gaussian_ssm  # noqa: F401

        t0 = time.perf_counter()
        ll = dynamax_fit(y, init, dx, dy, batched, args.worker_iters)
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        dynamax_fit(other_data(y), init, dx, dy, batched, args.worker_iters)
        second = time.perf_counter() - t0
        out = dict(fit_s=elapsed, second_fit_s=second, final_ll=ll)
    print("RESULT " + json.dumps(out))


HANGS: list = []  # (what, attempt) of every attempt that ran past its time limit


def fresh_fit(which, data_path, num_iters, timeout_s=240, cache_dir=None):
    """One worker process. With ``cache_dir``, JAX's persistent compilation cache is
    switched on there (``JAX_COMPILATION_CACHE_DIR``; every compile cached)."""
    env = dict(os.environ)
    if cache_dir is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        which,
        "--worker-data",
        data_path,
        "--worker-iters",
        str(num_iters),
    ]
    for attempt in range(MAX_ATTEMPTS):
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=timeout_s, env=env
            )
        except subprocess.TimeoutExpired:
            HANGS.append((f"fresh {which} {os.path.basename(data_path)}", attempt))
            print(f"  (fresh {which} fit hung for {timeout_s} s: retrying)", flush=True)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        raise RuntimeError(f"worker {which} failed:\n{proc.stdout}\n{proc.stderr}")
    raise RuntimeError(f"worker {which} hung {MAX_ATTEMPTS} times")


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------
def run_case(name, dx, dy, T, S, s, tmpdir):
    print(f"\n== {name} ==", flush=True)
    batched = S is not None
    y, init = make_case(dx, dy, T, S)
    data_path = os.path.join(tmpdir, f"{name}.npz")
    np.savez(data_path, y=y, dx=dx, dy=dy, **{f"init_{k}": v for k, v in init.items()})
    r = dict(name=name, dx=dx, dy=dy, T=T, S=S)

    r["ours"] = ours_step_time(y, init, dx, s["ours_repeats"])
    print(f"  ours     per-iter {1e3 * r['ours']['per_iter_s']:.3f} ms", flush=True)
    r["dynamax"] = dynamax_step_time(y, init, dx, dy, batched, s)
    r["dynamax"]["model"] = "LinearGaussianConjugateSSM" if batched else "LinearGaussianSSM"
    print(
        f"  dynamax  per-iter {1e3 * r['dynamax']['per_iter_s']:.3f} ms (scan), "
        f"{1e3 * r['dynamax']['per_iter_fit_em_diff_s']:.3f} ms (fit_em difference)",
        flush=True,
    )

    fit = partial(fresh_fit, data_path=data_path, timeout_s=s["fresh_timeout_s"])
    fits_o = [fit("ours", num_iters=s["fit_iters"]) for _ in range(s["fresh_repeats"])]
    fits_d = [fit("dynamax", num_iters=s["fit_iters"]) for _ in range(s["fresh_repeats"])]
    r["ours"]["fit_s"] = statistics.median(f["fit_s"] for f in fits_o)
    r["ours"]["final_ll"] = fits_o[0]["final_ll"]
    r["ours"]["floor_counts"] = fits_o[0]["floor_counts"]
    r["ours"]["warnings"] = fits_o[0]["warnings"]
    r["ours"]["fresh_init_s"] = fresh_fit("ours-init", data_path, 1, s["fresh_timeout_s"])["init_s"]
    r["dynamax"]["fit_s"] = statistics.median(f["fit_s"] for f in fits_d)
    r["dynamax"]["final_ll"] = fits_d[0]["final_ll"]
    for lib, fits in (("ours", fits_o), ("dynamax", fits_d)):
        r[lib]["second_fit_s"] = statistics.median(f["second_fit_s"] for f in fits)
        # fresh process with a warm persistent compilation cache (filled by a first run)
        cache = os.path.join(tmpdir, f"jax_cache_{name}_{lib}")
        fit(lib, num_iters=s["fit_iters"], cache_dir=cache)
        r[lib]["fit_warm_cache_s"] = fit(lib, num_iters=s["fit_iters"], cache_dir=cache)["fit_s"]
    print(
        f"  second fit in the same process: ours {r['ours']['second_fit_s']:.2f} s, dynamax "
        f"{r['dynamax']['second_fit_s']:.2f} s; fresh process with a warm compilation "
        f"cache: ours {r['ours']['fit_warm_cache_s']:.2f} s, dynamax "
        f"{r['dynamax']['fit_warm_cache_s']:.2f} s",
        flush=True,
    )
    print(
        f"  whole fit ({s['fit_iters']} it, fresh process): ours {r['ours']['fit_s']:.2f} s, "
        f"dynamax {r['dynamax']['fit_s']:.2f} s; ours EM.init alone "
        f"{r['ours']['fresh_init_s']:.2f} s, ours first step call (compile) "
        f"{r['ours']['first_call_s']:.2f} s",
        flush=True,
    )
    if batched:
        ll, first_bad = dynamax_plain_batch_ll(y, init, dx, dy, s["fit_iters"])
        r["dynamax"]["plain_lgssm_batch_final_ll"] = ll
        r["dynamax"]["plain_lgssm_batch_first_nonfinite_iter"] = first_bad

    if batched:
        r["pykalman"] = None  # pykalman has no batch EM
    else:
        if T <= s["pyk_long_T"]:
            n = s["fit_iters"] - 1  # ll at theta_{n}: same as the others' last reported value
            kf, elapsed = pykalman_em(y, init, n)
            ll = float(kf.loglikelihood(y))
        else:
            n = s["pyk_short_iters"]
            kf, elapsed = pykalman_em(y, init, n)
            ll = None
        r["pykalman"] = dict(per_iter_s=elapsed / n, n_iter=n, final_ll=ll)
        print(f"  pykalman per-iter {1e3 * elapsed / n:.1f} ms ({n} iterations)", flush=True)

    o, d, p = r["ours"], r["dynamax"], r["pykalman"]
    r["ratios"] = dict(
        ours_over_dynamax_per_iter=o["per_iter_s"] / d["per_iter_s"],
        ours_over_dynamax_per_iter_fit_em_diff=o["per_iter_s"] / d["per_iter_fit_em_diff_s"],
        ours_over_dynamax_fit=o["fit_s"] / d["fit_s"],
        pykalman_over_ours_per_iter=(p["per_iter_s"] / o["per_iter_s"]) if p else None,
    )
    return r


def run_case_in_child(index, name, quick, s, tmpdir):
    """``run_case`` in a child process with a time limit, retried if it hangs."""
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--case-index", str(index)]
    cmd += ["--case-dir", tmpdir] + (["--quick"] if quick else [])
    hangs = 0
    for _attempt in range(MAX_ATTEMPTS):
        try:
            proc = subprocess.run(cmd, check=False, timeout=s["case_timeout_s"])
        except subprocess.TimeoutExpired:
            hangs += 1
            print(f"  ({name}: no result after {s['case_timeout_s']} s: retrying)", flush=True)
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"case {name} failed (exit code {proc.returncode})")
        with open(os.path.join(tmpdir, f"result_{index}.json")) as f:
            r = json.load(f)
        r["case_attempts_hung"] = hangs
        return r
    print(f"  ({name}: hung {MAX_ATTEMPTS} times: skipped)", flush=True)
    return dict(name=name, hung=True, case_attempts_hung=hangs)


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def markdown(all_results, s):
    it = s["fit_iters"]
    results = [r for r in all_results if not r.get("hung")]
    lines = [
        "| case | ours ms/it | dynamax ms/it (scan) | dynamax ms/it (fit_em diff) "
        "| pykalman ms/it | ours/dyn per-it | ours fit s | dynamax fit s | ours/dyn fit "
        "| pykalman/ours | ours init s | ours compile s | dyn compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        o, d, p, q = r["ours"], r["dynamax"], r["pykalman"], r["ratios"]
        lines.append(
            f"| {r['name']} | {1e3 * o['per_iter_s']:.3f} | {1e3 * d['per_iter_s']:.3f} "
            f"| {1e3 * d['per_iter_fit_em_diff_s']:.3f} "
            f"| {_fmt(p and 1e3 * p['per_iter_s'], '.1f')} "
            f"| {q['ours_over_dynamax_per_iter']:.2f} | {o['fit_s']:.2f} | {d['fit_s']:.2f} "
            f"| {q['ours_over_dynamax_fit']:.2f} | {_fmt(q['pykalman_over_ours_per_iter'], '.0f')} "
            f"| {o['fresh_init_s']:.2f} | {o['first_call_s']:.2f} | {d['first_call_s']:.2f} |"
        )
    lines += [
        "",
        f"Final log-likelihood after {it} iterations (log p(y | theta_{it - 1})):",
        "",
        "| case | ours | dynamax | pykalman | ours cov. floor hits |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        o, d, p = r["ours"], r["dynamax"], r["pykalman"]
        dyn = f"{d['final_ll']:.3f}"
        if r["S"] is not None:
            dyn += " (conjugate SSM, incl. log prior)"
        pk = "no batch EM" if p is None else _fmt(p["final_ll"], ".3f")
        if p is not None and p["final_ll"] is None:
            pk = f"skipped (only {p['n_iter']} it timed)"
        lines.append(
            f"| {r['name']} | {o['final_ll']:.3f} | {dyn} | {pk} | {o['floor_counts'] or '-'} |"
        )
    lines += [
        "",
        "ours init s: EM.init alone in a fresh process (part of 'ours fit s'); compile s: "
        "first call of the jitted step (ours) / of the scan (dynamax), in-process.",
        "",
        "Whole fits, other settings (seconds):",
        "",
        "| case | ours, 2nd fit same process | dynamax, 2nd fit same process "
        "| ours, fresh + warm cache | dynamax, fresh + warm cache |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        o, d = r["ours"], r["dynamax"]
        lines.append(
            f"| {r['name']} | {_fmt(o.get('second_fit_s'), '.2f')} "
            f"| {_fmt(d.get('second_fit_s'), '.2f')} | {_fmt(o.get('fit_warm_cache_s'), '.2f')} "
            f"| {_fmt(d.get('fit_warm_cache_s'), '.2f')} |"
        )
    lines += ["", "Targets: ours/dyn per-it <= 1, ours/dyn fit <= 0.5, pykalman/ours >= 50.", ""]
    for r in results:
        q = r["ratios"]
        checks = [
            ("per-iter <= dynamax", q["ours_over_dynamax_per_iter"] <= 1.0),
            ("fit <= 0.5 dynamax", q["ours_over_dynamax_fit"] <= 0.5),
        ]
        if q["pykalman_over_ours_per_iter"] is not None:
            checks.append((">= 50x pykalman", q["pykalman_over_ours_per_iter"] >= 50))
        txt = ", ".join(f"{n}: {'PASS' if ok else 'FAIL'}" for n, ok in checks)
        lines.append(f"- {r['name']}: {txt}")
    for r in all_results:
        if r.get("hung"):
            lines.append(
                f"- {r['name']}: NO RESULT: every attempt deadlocked "
                f"({r['case_attempts_hung']} x {s['case_timeout_s']} s)"
            )
        elif r.get("case_attempts_hung") or r.get("hangs_in_fresh_fits"):
            lines.append(
                f"- {r['name']}: HANGS (deadlocked attempts, retried): case "
                f"{r.get('case_attempts_hung', 0)}, fresh fits {r.get('hangs_in_fresh_fits')}"
            )
    for r in results:
        d = r["dynamax"]
        if "plain_lgssm_batch_final_ll" in d:
            lines.append(
                f"- {r['name']}: dynamax LinearGaussianSSM batch EM final ll = "
                f"{d['plain_lgssm_batch_final_ll']}, first non-finite iteration: "
                f"{d['plain_lgssm_batch_first_nonfinite_iter']}"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized run")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--worker", choices=["ours", "ours-init", "dynamax"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-data", help=argparse.SUPPRESS)
    ap.add_argument("--worker-iters", type=int, default=NUM_FIT_ITERS, help=argparse.SUPPRESS)
    ap.add_argument("--case-index", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--case-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.case_index is not None:
        s = QUICK_SETTINGS if args.quick else FULL_SETTINGS
        cases = QUICK_CASES if args.quick else FULL_CASES
        r = run_case(*cases[args.case_index], s, args.case_dir)
        r["hangs_in_fresh_fits"] = [list(h) for h in HANGS]
        with open(os.path.join(args.case_dir, f"result_{args.case_index}.json"), "w") as f:
            json.dump(r, f)
        return None

    s = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    cases = QUICK_CASES if args.quick else FULL_CASES
    import dynamax
    import pykalman

    import ppl_dyn

    env = dict(
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(dv) for dv in jax.devices()],
        dynamax=getattr(dynamax, "__version__", "?"),
        pykalman=getattr(pykalman, "__version__", "?"),
        ppl_dyn=getattr(ppl_dyn, "__version__", "?"),
        quick=args.quick,
    )
    print("environment:", json.dumps(env), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for i, c in enumerate(cases):
            results.append(run_case_in_child(i, c[0], args.quick, s, tmpdir))
    table = markdown(results, s)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, settings=s, results=results, table=table), f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
