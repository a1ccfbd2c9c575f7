"""Benchmark: one EM iteration of the RBF model with the EKS E-step vs the particle E-step.

Run from the repository root::

    python benchmarks/eks_rbf.py [--quick] [--out results.json]

For T in {1000, 10000}, I in {11, 50} RBF centres and dx in {1, 3} states (dy = 2,
du = 1), the data are simulated from an RBF model with random weights, and we time one
jitted EM step (E-step + closed-form M-step, compile excluded, median of repeats):

* EKS + Gaussian-cloud statistics (closed-form RBF expectations), and
* the particle smoother (FFBSm, N = 100) feeding the same M-step,

and print the ratio particle / EKS. No external anchor exists for the RBF M-step; the
particle E-step is the comparison the issue asks for.
"""

import jax

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ppl_dyn  # noqa: E402
from ppl_dyn.infer import (  # noqa: E402
    EM,
    ExtendedKalmanSmoother,
    LinearGaussianMStep,
    ParticleSmoother,
)
from ppl_dyn.models import rbf  # noqa: E402


def problem(T, I, dx, seed=0):  # noqa: E741
    rng = np.random.default_rng(seed)
    centres = jnp.asarray(rng.uniform(-2, 2, size=(I, dx)))
    widths = jnp.full((I,), 1.0)
    params = dict(
        A=np.concatenate([0.3 * rng.normal(size=(dx, I)), 0.5 * np.eye(dx)], 1),
        B=rng.normal(size=(dx, 1)),
        b=np.zeros(dx),
        C=rng.normal(size=(2, dx)),
        D=np.zeros((2, 1)),
        d=np.zeros(2),
        Q=0.1 * np.eye(dx),
        R=0.1 * np.eye(2),
        m0=np.zeros(dx),
        P0=np.eye(dx),
    )
    u = rng.normal(size=(T, 1))
    kw = dict(u=u, state_dim=dx, centres=centres, widths=widths)
    y = ppl_dyn.simulate(jax.random.key(seed), rbf, params, num_steps=T, obs_dim=2, **kw)["y"]
    return params, dict(kw, y=np.asarray(y))


def time_step(e_step, params, kw, repeats):
    em = EM(rbf, e_step, LinearGaussianMStep(ridge=1e-3))
    state = em.init(jax.random.key(1), init_params=params, **kw)
    step, dynamic = em._compiled(kw)
    key = jax.random.key(2)
    jax.block_until_ready(step(state.params, dynamic, key, 0))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state.params, dynamic, key, 0))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    import ppl_dyn

    ppl_dyn.keep_freed_memory()  # what the CLI does: large freed blocks stay mapped
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 1000 only, fewer repeats")
    ap.add_argument("--num-particles", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Ts = (1000,) if args.quick else (1000, 10000)
    repeats = 3 if args.quick else 5
    rows = []
    print(f"{'T':>6} {'I':>3} {'dx':>2} | {'EKS s/iter':>10} {'PS s/iter':>10} {'PS/EKS':>7}")
    for T in Ts:
        for I in (11, 50):  # noqa: E741
            for dx in (1, 3):
                params, kw = problem(T, I, dx)
                t_eks = time_step(ExtendedKalmanSmoother(), params, kw, repeats)
                t_ps = time_step(ParticleSmoother(args.num_particles), params, kw, repeats)
                rows.append(dict(T=T, I=I, dx=dx, eks_s=t_eks, particle_s=t_ps, ratio=t_ps / t_eks))
                print(
                    f"{T:>6} {I:>3} {dx:>2} | {t_eks:>10.4f} {t_ps:>10.4f} {t_ps / t_eks:>7.1f}",
                    flush=True,
                )
    meta = dict(
        backend=jax.default_backend(),
        machine=platform.platform(),
        num_particles=args.num_particles,
        jax=jax.__version__,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
