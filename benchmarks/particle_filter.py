"""Benchmark: the bootstrap particle filter alone -- ppl_dyn vs ``particles`` vs cuthbert,
with a profile of one filter step by part and a bound from this machine's throughputs.

Run from the repository root::

    python benchmarks/particle_filter.py [--quick] [--smoothers] [--ns 1000,10000] [--out F.json]

Anchors (each skipped, with the reason printed and recorded, when it cannot be
imported): ``particles`` (N. Chopin's NumPy library; ``pip install --no-deps particles``,
its ``numpy<2`` pin is not needed; its ``joblib`` comes with the ``bench`` extra) and
cuthbert (in the ``bench`` extra; it runs on the same JAX as ppl_dyn). ``--quick``:
T = 100, N = 1000 only (the smoke size the tests run).

What is timed, all on the same simulated data (noisy tanh-RNN, dx = 2, dy = 1, T = 1000,
float64, ``benchmarks/particle_smoother.py``'s parameters), systematic resampling when the
ESS falls below N / 2, the full history kept (what a smoother needs):

* **ours** -- ``ppl_dyn.infer.particle.particle_filter`` jitted, all of its outputs
  (particles, log-weights, ancestors, ESS, per-step log-likelihood factors); compile
  excluded, the median of ``--repeats`` calls after one warm-up call.
* **particles** -- ``particles.SMC(fk=Bootstrap(...), N, resampling="systematic",
  ESSrmin=0.5, store_history=True).run()``, once per N (``OPENBLAS_NUM_THREADS=1``).
* **cuthbert** -- ``cuthbert.smc.particle_filter.build_filter`` with systematic resampling
  behind cuthbert's ESS decorator (threshold 0.5) and ``cuthbert.filter``, jitted, the
  median as for ours. Its initial state is unweighted (cuthbert's convention): it
  filters ``T - 1`` propagations from ``p(x_1)``, as ours does.
* **smoothers** (``--smoothers``) -- the filter followed by the linear-cost backward
  pass, M = 100 paths with one independent Metropolis-Hastings move per step started at
  the genealogical ancestor: ours (``ParticleSmoother(mode="ffbsi-mcmc")``, which also
  stores the filter history) against cuthbert's ``build_smoother`` with
  ``cuthbertlib.smc.smoothing.mcmc.simulate`` (``n_steps=1``); jitted, medians as above.
* **profile** -- each part of one step (the filter's own functions and shapes) in a
  jitted ``scan`` of T steps on its own: the Gaussian noise draw (``dx`` normals per
  particle), the transition mean, the emission log-likelihood with normalisation and
  ESS, resampling with the gather of the ancestors (every step), and the history writes
  (``8 dx + 12`` bytes per particle-step into fresh buffers). Parts run alone are not
  fused with their neighbours, so they need not add up to the whole.
* **bound** -- ``T N (dx t_normal + t_exp + B t_write)``: the time this machine needs
  just to draw the noise (``jax.random.normal`` on a large array), take one exponential per
  particle (``jnp.exp``) and write the ``B = 8 dx + 12`` bytes of history per
  particle-step to newly allocated memory (a ``scan`` storing its carry), each measured in
  this run. Any filter that keeps the history and uses JAX's generator pays at least that.

Ratios are speed-ups (anchor time / ours): above 1, ppl_dyn is faster.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy (particles' tiny BLAS calls)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from particle_smoother import model_params, particles_tanh_rnn  # noqa: E402


def _median_time(fn, repeats):
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def simulate(T, dx=2):
    import jax
    import jax.numpy as jnp

    import ppl_dyn
    from ppl_dyn.models import tanh_rnn

    p = {k: jnp.asarray(v) for k, v in model_params(dx).items()}
    sim = ppl_dyn.simulate(jax.random.key(dx), tanh_rnn, p, num_steps=T, state_dim=dx,
                           obs_dim=1, bias=False)  # fmt: skip
    return {k: np.asarray(v) for k, v in p.items()}, np.asarray(sim["y"])


def time_ours(params, y, N, repeats):
    import jax
    import jax.numpy as jnp

    from ppl_dyn.infer.particle import particle_filter
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    dx = params["A"].shape[0]

    @jax.jit
    def run(params, y, key):
        ss, spec = bind(tanh_rnn, params, y=y, state_dim=dx, bias=False)
        return particle_filter(key, ss, spec.y[0], spec.u[0], N)

    p = {k: jnp.asarray(v) for k, v in params.items()}
    yy = jnp.asarray(y)
    out = run(p, yy, jax.random.key(1))
    seconds = _median_time(lambda: run(p, yy, jax.random.key(1)), repeats)
    return seconds, float(out.log_marginal)


def _cuthbert_tanh_rnn(params, N):
    """The tanh-RNN for cuthbert: its particle filter (systematic resampling behind its
    ESS decorator at 0.5) and the joint log potential its backward samplers need."""
    import jax
    import jax.numpy as jnp
    from cuthbert.smc import particle_filter as cpf
    from cuthbertlib.resampling import adaptive, systematic
    from jax.scipy.stats import multivariate_normal, norm

    A, C, Q = (jnp.asarray(params[k]) for k in ("A", "C", "Q"))
    LQ = jnp.linalg.cholesky(Q)
    LP = jnp.linalg.cholesky(jnp.asarray(params["P0"]))
    m0 = jnp.asarray(params["m0"])
    sdR = jnp.sqrt(jnp.asarray(params["R"])[0, 0])
    dx = A.shape[0]

    def init_sample(key):
        return m0 + LP @ jax.random.normal(key, (dx,))

    def propagate_sample(key, x, inp):
        return A @ jnp.tanh(x) + LQ @ jax.random.normal(key, (dx,))

    def log_potential(x_prev, x, inp):
        return norm.logpdf(inp[0], C[0] @ jnp.tanh(x), sdR)

    def joint_log_potential(x_prev, x, inp):
        transition = multivariate_normal.logpdf(x, A @ jnp.tanh(x_prev), Q)
        return transition + log_potential(x_prev, x, inp)

    resampling = adaptive.ess_decorator(systematic.resampling, 0.5)
    filt = cpf.build_filter(init_sample, propagate_sample, log_potential, N, resampling)
    return filt, joint_log_potential


def time_cuthbert(params, y, N, repeats):
    import cuthbert
    import jax
    import jax.numpy as jnp

    filt, _ = _cuthbert_tanh_rnn(params, N)

    @jax.jit
    def run(y, key):
        k0, k1 = jax.random.split(key)
        state0 = filt.init_prepare(key=k0)
        return cuthbert.filter(filt, y[1:], state0, key=k1)

    yy = jnp.asarray(y)
    out = run(yy, jax.random.key(1))
    seconds = _median_time(lambda: run(yy, jax.random.key(1)), repeats)
    return seconds, float(out.log_normalizing_constant[-1])


def time_ours_smoother(params, y, N, M, repeats):
    """Ours: filter + ``ffbsi-mcmc`` backward pass (M paths, one IMH move per step)."""
    import jax
    import jax.numpy as jnp

    from ppl_dyn.infer import ParticleSmoother
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    dx = params["A"].shape[0]
    e_step = ParticleSmoother(num_particles=N, mode="ffbsi-mcmc", num_trajectories=M)

    @jax.jit
    def run(params, y, key):
        ss, spec = bind(tanh_rnn, params, y=y, state_dim=dx, bias=False)
        return e_step.posterior(key, ss, spec.y, spec.u).trajectories

    p = {k: jnp.asarray(v) for k, v in params.items()}
    yy = jnp.asarray(y)
    return _median_time(lambda: run(p, yy, jax.random.key(1)), repeats)


def time_cuthbert_smoother(params, y, N, M, repeats):
    """cuthbert: its particle filter + its MCMC backward sampler (one IMH move per
    step, M paths), the same work as ours' ``ffbsi-mcmc``."""
    from functools import partial

    import cuthbert
    import jax
    import jax.numpy as jnp
    from cuthbert.smc import backward_sampler as cbs
    from cuthbertlib.resampling import systematic
    from cuthbertlib.smc.smoothing import mcmc

    filt, joint_log_potential = _cuthbert_tanh_rnn(params, N)
    smoother = cbs.build_smoother(
        joint_log_potential, partial(mcmc.simulate, n_steps=1), systematic.resampling, M
    )

    @jax.jit
    def run(y, key):
        k0, k1, k2 = jax.random.split(key, 3)
        states = cuthbert.filter(filt, y[1:], filt.init_prepare(key=k0), key=k1)
        return cuthbert.smoother(smoother, states, key=k2).particles

    yy = jnp.asarray(y)
    return _median_time(lambda: run(yy, jax.random.key(1)), repeats)


def time_particles(params, y, N):
    import particles
    from particles import state_space_models as ssms

    fk = ssms.Bootstrap(ssm=particles_tanh_rnn(params), data=[float(v) for v in y[:, 0]])
    np.random.seed(1234)
    pf = particles.SMC(fk=fk, N=N, store_history=True, resampling="systematic", ESSrmin=0.5)
    t = time.perf_counter()
    pf.run()
    return time.perf_counter() - t, float(pf.summaries.logLts[-1])


def profile_parts(params, y, N, repeats):
    """Seconds for T steps of each part of a filter step, run alone (see the docstring)."""
    import jax
    import jax.numpy as jnp

    from ppl_dyn.infer import _linalg as la
    from ppl_dyn.infer.particle import _normalise, emission_log_lik
    from ppl_dyn.infer.resampling import systematic
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    T = y.shape[0]
    p = {k: jnp.asarray(v) for k, v in params.items()}
    yy = jnp.asarray(y)
    dx = p["A"].shape[0]

    def part(body, carry0):
        @jax.jit
        def run(p, yy, key):
            ss, spec = bind(tanh_rnn, p, y=yy, state_dim=dx, bias=False)
            u = spec.u[0]
            keys = jax.random.split(key, T)

            def step(c, inp):
                k, y_t, u_t = inp
                return body(ss, c, k, y_t, u_t), None

            return jax.lax.scan(step, carry0, (keys, spec.y[0], u))[0]

        return _median_time(lambda: run(p, yy, jax.random.key(2)), repeats)

    x0 = jnp.zeros((N, dx))
    lw0 = jnp.full((N,), -jnp.log(N))
    mask = jnp.ones((1,), bool)

    def noise(ss, x, k, y_t, u_t):
        L = la.cholesky(ss.transition_cov(u_t))
        return x + jax.random.normal(k, x.shape) @ L.T

    def mean(ss, x, k, y_t, u_t):
        return ss.transition_mean(x, u_t)

    def weights(ss, c, k, y_t, u_t):
        x, lw = c
        inc = emission_log_lik(ss, x, u_t, y_t, mask)
        lw, _ = _normalise(lw + inc)
        ess = 1.0 / jnp.sum(jnp.exp(2 * lw))
        return x + 1e-9 * ess, lw

    def resample(ss, c, k, y_t, u_t):
        x, lw = c
        idx = systematic(k, jnp.exp(lw), N)
        return x[idx], lw

    def history(x0):
        @jax.jit
        def run(x):
            def step(c, _):
                c = c * 0.999 + 0.001
                return c, c

            return jax.lax.scan(step, x, None, length=T)[1]

        return _median_time(lambda: run(x0), repeats)

    return {
        "noise (dx normals, Cholesky factor)": part(noise, x0),
        "transition mean A tanh(x)": part(mean, x0),
        "emission log-lik + normalise + ESS": part(weights, (x0, lw0)),
        "resample + gather (every step)": part(resample, (x0, lw0)),
        # the history: (T, N, dx) particles, (T, N) log-weights and (T, N) ancestors
        "history writes": history(jnp.zeros((N, dx + 2))) * (8 * dx + 12) / (8 * (dx + 2)),
    }


def throughputs(repeats):
    """Seconds per standard normal, per exp and per byte written to fresh memory."""
    import jax
    import jax.numpy as jnp

    # cache-sized arrays in a scan (a single huge array would measure page faults)
    n = 2**15

    @jax.jit
    def normals(key):
        def body(c, k):
            return c + jax.random.normal(k, (n,)), None

        return jax.lax.scan(body, jnp.zeros((n,)), jax.random.split(key, 256))[0]

    t_normal = _median_time(lambda: normals(jax.random.key(0)), repeats) / (n * 256)
    x = jnp.linspace(-3.0, 0.0, 2**16)

    @jax.jit
    def exps(x):
        return jax.lax.scan(lambda c, _: (jnp.exp(c) - 1.0, None), x, None, length=256)[0]

    t_exp = _median_time(lambda: exps(x), repeats) / (x.size * 256)

    @jax.jit
    def writes(x):
        return jax.lax.scan(lambda c, _: (c + 1.0, c), x, None, length=256)[1]

    z = jnp.zeros((2**15,))
    t_write = _median_time(lambda: writes(z), repeats) / (z.size * 8 * 256)
    return {"normal_s": t_normal, "exp_s": t_exp, "write_byte_s": t_write}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ns", default=None, help="comma-separated particle counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument(
        "--smoothers",
        action="store_true",
        help="also time filter + ffbsi-mcmc against cuthbert's MCMC backward sampler (M=100)",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import jax

    import ppl_dyn

    jax.config.update("jax_enable_x64", True)
    ppl_dyn.keep_freed_memory()  # what the CLI does: large freed blocks stay mapped
    T = 100 if a.quick else 1000
    ns = [int(v) for v in a.ns.split(",")] if a.ns else ([1000] if a.quick else [1000, 10_000])
    repeats = 2 if a.quick else a.repeats
    dx = 2
    params, y = simulate(T, dx)
    tp = throughputs(repeats)
    print(f"throughputs: {tp}", flush=True)
    result = {
        "settings": {"T": T, "dx": dx, "dy": 1, "ns": ns, "repeats": repeats},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },  # fmt: skip
        "throughputs": tp,
        "results": [],
    }
    for N in ns:
        row = {"N": N}
        row["ours_s"], row["ours_log_marginal"] = time_ours(params, y, N, repeats)
        per_step = dx * tp["normal_s"] + tp["exp_s"] + (8 * dx + 12) * tp["write_byte_s"]
        row["bound_s"] = T * N * per_step
        row["profile_s"] = profile_parts(params, y, N, repeats)
        print(f"N={N}: ours {row['ours_s']:.4f} s, bound {row['bound_s']:.4f} s", flush=True)
        for name, s in row["profile_s"].items():
            print(f"    {name:40s} {s:.4f} s  ({s / (T * N) * 1e9:.1f} ns/particle-step)")
        anchors = [] if a.no_anchors else [("particles", time_particles),
                                           ("cuthbert", time_cuthbert)]  # fmt: skip
        for name, fn in anchors:
            try:
                args = (params, y, N) if name == "particles" else (params, y, N, repeats)
                s, lz = fn(*args)
                row[f"{name}_s"], row[f"{name}_log_marginal"] = s, lz
                print(f"    {name}: {s:.4f} s (ours {s / row['ours_s']:.2f}x faster), log Z "
                      f"{lz:.2f} vs ours {row['ours_log_marginal']:.2f}", flush=True)  # fmt: skip
            except ImportError as e:
                row[f"{name}_skipped"] = f"not installed ({e})"
                print(f"    {name}: skipped, not installed ({e})", flush=True)
        if a.smoothers and not a.no_anchors:
            M = 100
            row["smoother_M"] = M
            row["ours_ffbsi_mcmc_s"] = time_ours_smoother(params, y, N, M, repeats)
            msg = f"    filter + ffbsi-mcmc (M={M}): ours {row['ours_ffbsi_mcmc_s']:.4f} s"
            try:
                cb = time_cuthbert_smoother(params, y, N, M, repeats)
                row["cuthbert_mcmc_smoother_s"] = cb
                msg += f", cuthbert {cb:.4f} s (ours {cb / row['ours_ffbsi_mcmc_s']:.2f}x faster)"
            except ImportError as e:
                row["cuthbert_mcmc_smoother_skipped"] = f"not installed ({e})"
                msg += f", cuthbert skipped ({e})"
            print(msg, flush=True)
        result["results"].append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
