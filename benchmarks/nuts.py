"""Benchmark: NUTS on a linear dynamical system -- latent states sampled vs integrated out,
NumPyro vs BlackJAX, and NUTS over dynamax's Kalman filter; initialisation from EM.

Run from the repository root (about 30-60 minutes on a 2-core CPU, several hours with
``--free``; close other CPU-heavy processes, timings are wall-clock)::

    nice python benchmarks/nuts.py [--quick] [--free] [--out results.json]

It needs the ``bench`` extra for dynamax (``pip install -e .[bench]``). ``--quick`` runs
every case at smoke size (T = 50, 50 + 50 draws) in a few minutes.

Model and data: ``ppl_dyn.models.lds`` with ``state_dim = 2``, ``obs_dim = 1``, one sequence
simulated from fixed parameters (below), T = 200 (its first 200 steps) and T = 1000. By
default the model is put in an *identified* form by conditioning (``numpyro.handlers.
condition``) the observation row ``C = (1, 0)``, the state noise ``Q = 0.1 I``, the state
offset ``b = 0`` and the initial state ``m0 = 0, P0 = I`` on their true values, so that
``A`` (4 entries), ``R`` and ``d`` are free under the built-in priors. With every site free
the LDS is identified only up to an invertible change of state basis (and ``b`` trades off
against ``d``), NUTS then spends most draws at its maximum tree depth walking along that
ridge, and one case takes most of an hour here; ``--free`` runs that version. The
identified form keeps one discrete symmetry -- flipping the sign of the second state
flips ``A[0, 1]`` and ``A[1, 0]`` together -- so the posterior has two mirror-image modes;
ESS and R-hat are reported for all free entries and for the sign-invariant quantities
``A[0, 0]``, ``A[1, 1]``, ``A[0, 1] A[1, 0]``, ``R``, ``d`` and ``lp``.

Cases, each in a fresh child process (so every row pays its own compilation), float64:

* ``latent``: the states sampled, non-centred (``ppl_dyn.handlers.noncentered(lds)``);
* ``marginal``: the states integrated out (``ppl_dyn.handlers.marginalize(lds)``: the
  Kalman filter, gradients by Fisher's identity);
* ``dynamax``: the same model and priors with the log-marginal computed by dynamax's
  ``lgssm_filter`` (``marginalize(lds, e_step=DynamaxFilter())``), differentiated by JAX;

each sampled by ``numpyro.infer.MCMC(NUTS(...), chain_method="vectorized")`` and by
``ppl_dyn.mcmc.run_blackjax`` (BlackJAX NUTS with window adaptation, chains vmapped),
2 chains x (500 warmup + 500 draws) at T = 200 and 300 + 300 at T = 1000 (also for the
4-chain cases), from the default initialisation (uniform in (-2, 2) on the unconstrained
scale); with ``--free``, the latent form at T = 1000 uses 250 + 250 at a maximum tree
depth of 8. ESS per second is a rate, so the rows
stay comparable.
dynamax runs through BlackJAX only (the sampler is then identical and only the
likelihood differs).

Reported per case: wall time (compile included; for BlackJAX also compile and sampling
separately), the minimum bulk ESS over all parameter entries and over the identified
quantities (above), ESS per second for both, max R-hat, divergences and mean leapfrog
steps per draw.

Finally ``init``: 4 chains of BlackJAX NUTS on the marginal model at T = 1000, from the
default initialisation and from an EM fit (``run_blackjax(..., init_params=em_result)``),
with their max R-hat.

Targets (from the issue): marginal >= 5x latent in ESS/s at T = 1000 and >= 3x NUTS over
dynamax's filter; BlackJAX at least as fast as NumPyro; from the EM fit 4 chains reach
R-hat < 1.01 where the default initialisation does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any, NamedTuple

CASE_TIMEOUT_S = 2400

TRUE = dict(
    A=[[0.9, 0.2], [-0.2, 0.8]],
    C=[[1.0, 0.0]],
    Q=[[0.1, 0.0], [0.0, 0.1]],
    R=[[0.2]],
    b=[0.0, 0.0],
    d=[0.5],
    m0=[0.0, 0.0],
    P0=[[1.0, 0.0], [0.0, 1.0]],
)
FIXED = ("C", "Q", "b", "m0", "P0")  # conditioned on TRUE unless --free


# --------------------------------------------------------------------------------------
# child: one case
# --------------------------------------------------------------------------------------


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore", FutureWarning)


def data(T: int):
    import jax
    import numpy as np

    import ppl_dyn
    from ppl_dyn.models import lds

    params = {k: np.asarray(v, float) for k, v in TRUE.items()}
    sim = ppl_dyn.simulate(jax.random.key(0), lds, params, num_steps=1000, state_dim=2, obs_dim=1)
    return np.asarray(sim["y"])[:T]


class FilterResult(NamedTuple):
    log_marginal: Any
    predicted_log_probs: Any


class DynamaxFilter:
    """An E-step whose log-marginal is dynamax's ``lgssm_filter`` (for the comparison).

    The affine-Gaussian form of the model is read off by ppl_dyn's bridge; dynamax gets
    time-varying offsets. It reports no per-step terms (NaN)."""

    def posterior(self, rng_key, ss, y, u):
        import jax
        import jax.numpy as jnp
        from dynamax.linear_gaussian_ssm.inference import (
            ParamsLGSSM,
            ParamsLGSSMDynamics,
            ParamsLGSSMEmissions,
            ParamsLGSSMInitial,
            lgssm_filter,
        )

        from ppl_dyn.infer.kalman import linear_gaussian_view

        def one(y_s, u_s):
            v = linear_gaussian_view(ss, u_s)
            dx, dy = v.F.shape[0], v.H.shape[0]
            params = ParamsLGSSM(
                initial=ParamsLGSSMInitial(mean=v.m0, cov=v.P0),
                dynamics=ParamsLGSSMDynamics(
                    weights=v.F, bias=v.c, input_weights=jnp.zeros((dx, 0)), cov=v.Q
                ),
                emissions=ParamsLGSSMEmissions(
                    weights=v.H, bias=v.e, input_weights=jnp.zeros((dy, 0)), cov=v.R
                ),
            )
            return lgssm_filter(params, y_s).marginal_loglik

        ll = jax.vmap(one)(y, u)
        return FilterResult(ll, jnp.full(y.shape[:2], jnp.nan, y.dtype))


ALL_PARAMS = ("A", "C", "Q", "R", "b", "d", "m0", "P0")


def base_model(free: bool):
    """``lds``, with the FIXED sites conditioned on their true values unless ``free``."""
    import numpy as np
    from numpyro.handlers import condition

    from ppl_dyn.models import lds

    if free:
        return lds
    return condition(lds, {k: np.asarray(TRUE[k], float) for k in FIXED})


def summarise(idata, wall_s, extra=None, free=False):
    import arviz as az
    import numpy as np

    post = idata.posterior
    params = [k for k in ALL_PARAMS if free or k not in FIXED]
    ess = az.ess(post[params], method="bulk")
    min_ess = float(min(np.nanmin(ess[k].values) for k in params))
    rhat = az.rhat(post[params])
    max_rhat = float(max(np.nanmax(rhat[k].values) for k in params))
    A = post["A"].values
    ident = {
        "A00": A[..., 0, 0],
        "A11": A[..., 1, 1],
        "A01*A10": A[..., 0, 1] * A[..., 1, 0],
        "R": post["R"].values[..., 0, 0],
        "d": post["d"].values[..., 0],
        "lp": idata.sample_stats["lp"].values,
    }
    if free:  # only basis-invariant quantities are identified
        ident = {
            "trA": A[..., 0, 0] + A[..., 1, 1],
            "detA": A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0],
            "R": ident["R"],
            "lp": ident["lp"],
        }
    ess_id = {k: float(az.ess(v, method="bulk")) for k, v in ident.items()}
    rhat_id = {k: float(az.rhat(v)) for k, v in ident.items()}
    st = idata.sample_stats
    out = {
        "wall_s": wall_s,
        "min_ess_params": min_ess,
        "min_ess_identified": min(ess_id.values()),
        "ess_identified": ess_id,
        "rhat_identified": rhat_id,
        "ess_per_s_params": min_ess / wall_s,
        "ess_per_s_identified": min(ess_id.values()) / wall_s,
        "max_rhat_params": max_rhat,
        "max_rhat_identified": max(rhat_id.values()),
        "divergences": int(st["diverging"].sum()),
        "draws": int(post.sizes["chain"] * post.sizes["draw"]),
        "mean_n_steps": float(st["n_steps"].mean()) if "n_steps" in st else None,
    }
    out.update(extra or {})
    return out


def run_case(
    form: str,
    backend: str,
    T: int,
    quick: bool,
    init: str = "default",
    chains: int = 2,
    dense: bool = False,
    free: bool = False,
    num_draws: int | None = None,
):
    _setup()
    import jax
    from numpyro.infer import MCMC, NUTS

    import ppl_dyn
    from ppl_dyn.handlers import marginalize, noncentered

    lds = base_model(free)
    y = data(T)
    warm = draws = 50 if quick else 500
    depth = 10
    if T >= 1000 and not quick:
        warm = draws = 300  # (NUTS over dynamax's filter would take ~40 min at 500 + 500)
    if free and form == "latent" and T >= 1000 and not quick:
        warm = draws = 250
        depth = 8
    if num_draws is not None:  # --draws: warm-up and draws per chain for the selected cases
        warm = draws = int(num_draws)
    model = {
        "latent": lambda: noncentered(lds),
        "marginal": lambda: marginalize(lds),
        "dynamax": lambda: marginalize(lds, e_step=DynamaxFilter()),
    }[form]()
    kw = dict(y=y, state_dim=2)
    extra = {
        "num_warmup": warm,
        "num_samples": draws,
        "max_tree_depth": depth,
        "dense": dense,
        "free": free,
    }
    if backend == "numpyro":
        t0 = time.perf_counter()
        mcmc = MCMC(
            NUTS(model, max_tree_depth=depth, dense_mass=dense),
            num_warmup=warm,
            num_samples=draws,
            num_chains=chains,
            chain_method="vectorized",
            progress_bar=False,
        )
        mcmc.run(jax.random.key(1), extra_fields=ppl_dyn.mcmc.EXTRA_FIELDS, **kw)
        jax.block_until_ready(mcmc.get_samples())
        wall = time.perf_counter() - t0
        idata = ppl_dyn.to_inference_data(mcmc, log_likelihood=False)
        return summarise(idata, wall, extra, free)
    init_params = None
    if init == "em":
        from ppl_dyn.infer import EM, KalmanSmoother

        t_em = time.perf_counter()
        init_params = EM(lds, KalmanSmoother()).run(
            jax.random.key(3), 200, rtol=1e-10, progress_bar=False, **kw
        )
        extra["em_s"] = time.perf_counter() - t_em
        extra["em_iters"] = init_params.num_iters
    t0 = time.perf_counter()
    run = ppl_dyn.mcmc.run_blackjax(
        jax.random.key(1),
        model,
        num_warmup=warm,
        num_samples=draws,
        num_chains=chains,
        max_num_doublings=depth,
        dense_mass=dense,
        init_params=init_params,
        print_summary=False,
        **kw,
    )
    wall = time.perf_counter() - t0
    extra.update(run.timing)
    idata = ppl_dyn.to_inference_data(run, log_likelihood=False)
    return summarise(idata, wall, extra, free)


# --------------------------------------------------------------------------------------
# parent: all cases, each in a child process
# --------------------------------------------------------------------------------------


def cases(quick: bool):
    Ts = (50,) if quick else (200, 1000)
    out = []
    for T in Ts:
        for form in ("latent", "marginal", "dynamax"):
            for backend in ("numpyro", "blackjax"):
                if form == "dynamax" and backend == "numpyro":
                    continue
                out.append(dict(form=form, backend=backend, T=T))
    T_init = Ts[-1]
    for init in ("default", "em"):
        out.append(dict(form="marginal", backend="blackjax", T=T_init, init=init, chains=4))
    for T in Ts:  # the latent form started from the EM fit (parameters and smoothed states)
        out.append(dict(form="latent", backend="blackjax", T=T, init="em", chains=4))
    return out


def name_of(c):
    s = f"{c['form']}/{c['backend']}/T={c['T']}"
    if "init" in c:
        s += f"/4 chains/init={c['init']}"
    return s


def run_child(case, quick):
    cmd = [sys.executable, __file__, "--child", json.dumps(case)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CASE_TIMEOUT_S} s"}
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def report(results):
    def row(name):
        return results.get(name, {})

    print(
        "\n| case | wall s | compile s | min ESS (params) | ESS/s (params) | min ESS "
        "(identified) | ESS/s (identified) | max R-hat | div | steps/draw |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | NO RESULT: {r['error'].splitlines()[-1][:80]} |")
            continue
        print(
            f"| {name} | {r['wall_s']:.1f} | {r.get('compile_s', float('nan')):.1f} | "
            f"{r['min_ess_params']:.1f} | {r['ess_per_s_params']:.3f} | "
            f"{r['min_ess_identified']:.1f} | {r['ess_per_s_identified']:.3f} | "
            f"{r['max_rhat_params']:.3f} | {r['divergences']} | {r['mean_n_steps']:.1f} |"
        )
    print("\nRatios (ESS/s over the parameters; identified quantities in brackets):")
    Ts = sorted({int(n.split("T=")[1].split("/")[0]) for n in results})
    for T in Ts:
        for backend in ("numpyro", "blackjax"):
            m, lat = row(f"marginal/{backend}/T={T}"), row(f"latent/{backend}/T={T}")
            if "wall_s" in m and "wall_s" in lat:
                print(
                    f"  T={T} {backend}: marginal / latent = "
                    f"{m['ess_per_s_params'] / max(lat['ess_per_s_params'], 1e-12):.1f}x "
                    f"[{m['ess_per_s_identified'] / max(lat['ess_per_s_identified'], 1e-12):.1f}x]"
                    "  (target >= 5x at T = 1000)"
                )
        m, dyn = row(f"marginal/blackjax/T={T}"), row(f"dynamax/blackjax/T={T}")
        if "wall_s" in m and "wall_s" in dyn:
            print(
                f"  T={T} marginal vs NUTS over dynamax's filter: "
                f"{m['ess_per_s_params'] / max(dyn['ess_per_s_params'], 1e-12):.1f}x "
                f"[{m['ess_per_s_identified'] / max(dyn['ess_per_s_identified'], 1e-12):.1f}x]"
                f"; sampling time {dyn['sampling_s'] / m['sampling_s']:.1f}x  (target >= 3x)"
            )
        for form in ("marginal", "latent"):
            bj, npy = row(f"{form}/blackjax/T={T}"), row(f"{form}/numpyro/T={T}")
            if "wall_s" in bj and "wall_s" in npy:
                print(
                    f"  T={T} {form}: BlackJAX / NumPyro wall time = "
                    f"{bj['wall_s'] / npy['wall_s']:.2f} (<= 1 is the target); ESS/s ratio "
                    f"{bj['ess_per_s_params'] / max(npy['ess_per_s_params'], 1e-12):.2f} "
                    f"[{bj['ess_per_s_identified'] / max(npy['ess_per_s_identified'], 1e-12):.2f}]"
                )
    for name, r in results.items():
        if "/init=" in name and "wall_s" in r:
            print(
                f"  {name}: max R-hat params {r['max_rhat_params']:.3f}, identified "
                f"{r['max_rhat_identified']:.3f} (target < 1.01 from EM)"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--free", action="store_true", help="all LDS sites free (not identified)")
    ap.add_argument("--draws", type=int, default=None, help="warm-up = draws per chain")
    ap.add_argument("--dense", action="store_true", help="adapt a dense mass matrix")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run_case(quick=args.quick, **json.loads(args.child))))
        return
    import platform

    results = {}
    for case in cases(args.quick):
        name = name_of(case)
        if args.free:
            case = dict(case, free=True)
        if args.draws is not None:
            case = dict(case, num_draws=args.draws)
        if args.dense:
            case = dict(case, dense=True)
        if args.only and args.only not in name:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run_child(case, args.quick)
        r = results[name]
        if "error" in r:
            print("   NO RESULT:", r["error"].splitlines()[-1][:200], flush=True)
        else:
            print(
                f"   wall {r['wall_s']:.1f} s, min ESS {r['min_ess_params']:.1f} "
                f"(identified {r['min_ess_identified']:.1f}), R-hat {r['max_rhat_params']:.3f}",
                flush=True,
            )
    report(results)
    if args.out:
        meta = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "free": args.free,
            "fixed": [] if args.free else list(FIXED),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
