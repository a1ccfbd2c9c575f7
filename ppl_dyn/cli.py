"""Command-line interface: ``ppl-dyn demo [--out DIR]``.

The CLI is an application, so it enables float64 for its own runs (the library itself
never changes JAX's precision on import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _demo(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import ppl_dyn
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds
    from ppl_dyn.plots import demo_figure

    out = Path(args.out)
    dx, dy, T, S = 2, 3, args.num_steps, args.num_sequences
    theta = 2 * np.pi / 25
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    true = {
        "A": jnp.asarray(0.97 * rot),
        "C": jnp.asarray([[1.0, 0.0], [0.5, 1.0], [-0.7, 0.4]]),
        "Q": 0.05 * jnp.eye(dx),
        "R": 0.2 * jnp.eye(dy),
        "b": jnp.zeros(dx),
        "d": jnp.asarray([0.5, -0.3, 0.0]),
        "m0": jnp.zeros(dx),
        "P0": jnp.eye(dx),
    }
    key = jax.random.key(args.seed)
    k_sim, k_fit = jax.random.split(key)
    sim = ppl_dyn.simulate(
        k_sim, lds, true, num_steps=T, num_sequences=S, state_dim=dx, obs_dim=dy
    )
    y, x = np.asarray(sim["y"]), np.asarray(sim["x"])
    print(f"simulated an LDS: {S} sequences x {T} steps, state_dim={dx}, obs_dim={dy}")
    t0 = time.perf_counter()
    result = EM(lds, KalmanSmoother()).run(
        k_fit, args.num_iters, y=y, state_dim=dx, rtol=1e-8, progress_bar=not args.quiet
    )
    fit_seconds = time.perf_counter() - t0
    smoother = KalmanSmoother()
    post = smoother.smooth(result.params, lds, y=y, state_dim=dx)
    post_true = smoother.smooth(true, lds, y=y, state_dim=dx)
    ll_fit = float(jnp.sum(post.log_marginal))
    ll_true = float(jnp.sum(post_true.log_marginal))
    eig_true = np.sort_complex(np.linalg.eigvals(np.asarray(true["A"])))
    eig_fit = np.sort_complex(np.linalg.eigvals(np.asarray(result.params["A"])))
    lls = result.log_marginals
    monotone = bool(np.all(np.diff(lls) >= -1e-9 * np.abs(lls[:-1])))

    # figures: sequence 1; states mapped to the true basis by least squares (the latent
    # state is identified only up to an invertible linear map)
    m = np.asarray(post.means[0])
    P = np.asarray(post.covs[0])
    design = np.concatenate([m, np.ones((T, 1))], 1)
    coef, *_ = np.linalg.lstsq(design, x[0], rcond=None)
    M = coef[:dx].T
    states_mean = design @ coef
    states_sd = np.sqrt(np.einsum("ij,tjk,ik->ti", M, P, M))
    C, d, R = (np.asarray(result.params[k]) for k in ("C", "d", "R"))
    recon_mean = m @ C.T + d
    recon_sd = np.sqrt(np.einsum("ij,tjk,ik->ti", C, P, C) + np.diag(R))
    out.mkdir(parents=True, exist_ok=True)
    fig_path = out / "demo.png"
    demo_figure(fig_path, y[0], recon_mean, recon_sd, x[0], states_mean, states_sd, lls, ll_true)
    metrics = {
        "model": "lds",
        "num_sequences": S,
        "num_steps": T,
        "state_dim": dx,
        "obs_dim": dy,
        "em_iterations": int(result.num_iters),
        "converged": bool(result.converged),
        "fit_seconds": fit_seconds,
        "log_marginal_fitted": ll_fit,
        "log_marginal_true_params": ll_true,
        "em_monotone": monotone,
        "eigenvalues_A_true": [[float(e.real), float(e.imag)] for e in eig_true],
        "eigenvalues_A_fitted": [[float(e.real), float(e.imag)] for e in eig_fit],
        "covariance_floor_counts": {k: int(v) for k, v in result.floor_counts.items()},
        "log_marginals": [float(v) for v in lls],
    }
    params_out = {k: np.asarray(v).tolist() for k, v in result.params.items()}
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    _atomic_write(out / "params.json", json.dumps(params_out, indent=2))
    print(f"EM: {result.num_iters} iterations in {fit_seconds:.2f} s "
          f"(converged: {result.converged}, monotone: {monotone})")
    print(f"log p(y): fitted {ll_fit:.3f}   true parameters {ll_true:.3f}")
    print("eigenvalues of A: true " + _fmt(eig_true) + "   fitted " + _fmt(eig_fit))
    print(f"report: {out / 'metrics.json'} and figure {fig_path}")
    return 0


def _fmt(eigs):
    return "[" + ", ".join(f"{e.real:.3f}{e.imag:+.3f}j" for e in eigs) + "]"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppl-dyn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="simulate an LDS, fit it by EM, write a report")
    d.add_argument("--out", default="ppl-dyn-demo", help="output directory")
    d.add_argument("--num-steps", type=int, default=500)
    d.add_argument("--num-sequences", type=int, default=2)
    d.add_argument("--num-iters", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    r = sub.add_parser("reproduce", help="reproduce a seed paper's experiment")
    r.add_argument(
        "name",
        choices=["unkelbach", "ghahramani"],
        help="unkelbach: seed 000 (particle EM, tanh-RNN); ghahramani: seed 001 (EKS + RBF)",
    )
    r.add_argument("--out", default=None, help="output directory (default: reproduce-NAME)")
    r.add_argument("--num-seeds", type=int, default=5, help="data seeds (median reported)")
    r.add_argument("--num-particles", type=int, default=100)
    r.add_argument(
        "--num-iters", type=int, default=None, help="EM iterations (default 100; RBF EM: 20)"
    )
    r.add_argument(
        "--series-length", type=int, default=2000, help="ghahramani: train + test length"
    )
    r.add_argument("--no-n10", action="store_true", help="skip the N = 10 comparison")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_reproduce)
    return p


def _reproduce(args) -> int:
    if args.num_seeds < 1 or args.num_particles < 1 or args.series_length < 20:
        print("ppl-dyn: --num-seeds and --num-particles must be >= 1 and "
              "--series-length >= 20", file=sys.stderr)
        return 2
    out = Path(args.out or f"reproduce-{args.name}")
    if args.name == "ghahramani":
        from ppl_dyn.reproduce import ghahramani

        ghahramani.main(out, num_seeds=args.num_seeds, num_steps=args.series_length,
                        rbf_iters=args.num_iters or 20, progress_bar=not args.quiet)
        return 0
    from ppl_dyn.reproduce import unkelbach

    unkelbach.main(out, num_seeds=args.num_seeds, num_particles=args.num_particles,
                   num_iters=args.num_iters or 100, compare_n10=not args.no_n10,
                   progress_bar=not args.quiet)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "num_steps", 2) < 2 or (getattr(args, "num_iters", 1) or 1) < 1:
        print("ppl-dyn: --num-steps must be >= 2 and --num-iters >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
