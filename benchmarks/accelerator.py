"""Absolute times of the large cases on whatever device JAX finds (a GPU when present).

Run from the repository root::

    python benchmarks/accelerator.py [--small] [--out results.json] [--append-results]

Meant for one prepared run on an accelerator (``--append-results`` adds a section to
``benchmarks/results.md`` with the device named). ``--small`` runs every case at small
sizes on any device in about a minute: the default tests run it that way on the CPU, so
the script keeps working where no accelerator is lent.

Cases (float32 on accelerators, float64 on the CPU; compilation excluded, median of
repeats):

* **FFBSm E-step** (tanh-RNN, dx = 2, T = 1000, N = 10^4; small: N = 256, T = 100):
  filter + FFBSm + statistics, against the device's measured ``exp`` throughput: the
  backward pass needs at least ``(T - 1) N^2`` exponentials (the "bound"); the issue's
  target is within 3x of it.
* **ffbsi-mcmc E-step** (N = 10^5, T = 1000, M = 100 paths; small: N = 1000, T = 100):
  the linear-cost mode; target <= 1 s per pass on one H100.
* **LDS EM on ragged sequences** (4096 sequences, lengths 50..100, dx = dy = 2; small:
  64): one jitted EM iteration.
* **NUTS on the marginalised LDS** (identified form, T = 200, dx = 2, dy = 2,
  500 + 500; small: T = 50, 30 + 30): NumPyro NUTS over the parameters, the states
  integrated out by the Kalman smoother (Fisher-identity gradients); time per draw,
  compilation included.
"""

import argparse
import json
import time

import jax
import numpy as np


def _timeit(fn, repeats=3):
    out = fn()  # compiles
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def exp_throughput(dtype) -> float:
    """Exponentials per second of ``exp`` fused into a row sum (what FFBSm does)."""
    block = jax.numpy.asarray(np.random.default_rng(0).normal(size=(1024, 1024)), dtype)

    @jax.jit
    def many(b):
        def body(c, _):
            return c + jax.numpy.sum(jax.numpy.exp(b * 0.5 + c * 1e-9)), None

        return jax.lax.scan(body, jax.numpy.zeros((), dtype), None, length=64)[0]

    t = _timeit(lambda: many(block))
    return 64 * block.size / t


def ffbsm_case(small, dtype_name):
    from ppl_dyn.infer import LinearGaussianMStep, ParticleSmoother
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    T, N = (100, 256) if small else (1000, 10_000)
    sim = ppl_dyn_simulate(tanh_rnn, T, state_dim=2, obs_dim=1, bias=False)
    e_step = ParticleSmoother(num_particles=N, chunk_size=min(N, 1024))

    @jax.jit
    def run(params, y, key):
        ss, spec = bind(tanh_rnn, params, y=y, state_dim=2, bias=False)
        post = e_step.posterior(key, ss, spec.y, spec.u)
        return LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)

    seconds = _timeit(lambda: run(sim["params"], sim["y"], jax.random.key(1)))
    bound = (T - 1) * N**2 / exp_throughput(sim["y"].dtype)
    return {"T": T, "N": N, "seconds": seconds, "exp_bound_seconds": bound,
            "ratio_to_bound": seconds / bound}  # fmt: skip


def mcmc_case(small, dtype_name):
    from ppl_dyn.infer import ParticleSmoother
    from ppl_dyn.models import tanh_rnn
    from ppl_dyn.state_space import bind

    T, N, M = (100, 1000, 20) if small else (1000, 100_000, 100)
    sim = ppl_dyn_simulate(tanh_rnn, T, state_dim=2, obs_dim=1, bias=False)
    e_step = ParticleSmoother(num_particles=N, mode="ffbsi-mcmc", num_trajectories=M)

    @jax.jit
    def run(params, y, key):
        ss, spec = bind(tanh_rnn, params, y=y, state_dim=2, bias=False)
        return e_step.posterior(key, ss, spec.y, spec.u).log_marginal

    seconds = _timeit(lambda: run(sim["params"], sim["y"], jax.random.key(1)))
    return {"T": T, "N": N, "M": M, "seconds": seconds}


def ragged_em_case(small, dtype_name):
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds

    S = 64 if small else 4096
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 101, size=S)
    y = rng.normal(size=(S, 100, 2)).astype(dtype_name)
    em = EM(lds, KalmanSmoother())
    kwargs = {"y": y, "lengths": lengths, "state_dim": 2}
    state = em.init(jax.random.key(0), **kwargs)
    em.update(state, **kwargs)  # compiles
    t = time.perf_counter()
    for _ in range(3):
        state, ll = em.update(state, **kwargs)
    jax.block_until_ready(ll)
    return {"S": S, "seconds_per_iteration": (time.perf_counter() - t) / 3}


def nuts_case(small, dtype_name):
    from numpyro.infer import MCMC, NUTS

    from ppl_dyn.handlers import marginalize
    from ppl_dyn.models import lds

    T, n = (50, 30) if small else (200, 500)
    sim = ppl_dyn_simulate(lds, T, state_dim=2, obs_dim=2)
    mcmc = MCMC(NUTS(marginalize(lds)), num_warmup=n, num_samples=n, progress_bar=False)
    t = time.perf_counter()
    mcmc.run(jax.random.key(1), y=sim["y"], state_dim=2, identified=True)
    jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - t
    return {"T": T, "warmup": n, "samples": n, "seconds": seconds,
            "seconds_per_draw": seconds / (2 * n)}  # fmt: skip


def ppl_dyn_simulate(model, T, **kw):
    import ppl_dyn

    sim = ppl_dyn.simulate(jax.random.key(0), model, num_steps=T, **kw)
    dtype = jax.numpy.result_type(float)
    return {"y": np.asarray(sim["y"], dtype), "params": sim["params"]}


CASES = {"ffbsm": ffbsm_case, "ffbsi_mcmc": mcmc_case, "ragged_em": ragged_em_case,
         "nuts_marginal": nuts_case}  # fmt: skip


def main(argv=None):
    import ppl_dyn

    ppl_dyn.keep_freed_memory()  # what the CLI does: large freed blocks stay mapped
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small sizes (any device)")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)}")  # fmt: skip
    ap.add_argument("--append-results", action="store_true",
                    help="append a section to benchmarks/results.md")  # fmt: skip
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if on_cpu:
        jax.config.update("jax_enable_x64", True)
    dtype_name = "float64" if on_cpu else "float32"
    report = {"device": f"{device.platform}: {device.device_kind}", "dtype": dtype_name,
              "small": args.small, "jax": jax.__version__, "cases": {}}  # fmt: skip
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    for name in chosen:
        case = CASES[name]
        t = time.perf_counter()
        report["cases"][name] = case(args.small, dtype_name)
        print(f"{name}: {report['cases'][name]} ({time.perf_counter() - t:.1f} s in all)",
              flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.append_results:
        with open("benchmarks/results.md", "a") as f:
            f.write(
                f"\n## Accelerator run ({report['device']}, {dtype_name}, JAX "
                f"{jax.__version__})\n\n```\n{json.dumps(report['cases'], indent=1)}\n```\n"
            )
    return report


if __name__ == "__main__":
    main()
