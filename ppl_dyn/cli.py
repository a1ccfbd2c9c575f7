"""Command-line interface: ``ppl-dyn demo | simulate | fit | report | reproduce``.

The CLI is an application, so it enables float64 for its own runs (the library itself
never changes JAX's precision on import). Every run writes into a fresh temporary
directory next to ``--out`` and moves it into place only when everything is written, so
a failed run leaves nothing behind. Problems with the input (bad files, wrong columns,
non-numeric cells, too-short series, bad flags) print one line on stderr and exit with
status 2 before any output is created. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import sys

from ppl_dyn import workflows
from ppl_dyn._malloc import keep_freed_memory
from ppl_dyn.workflows import (  # noqa: F401  (public here: ppl_dyn.cli.fit_verdict, ...)
    E_STEPS,
    FIT_FAILED,
    INTERRUPTED,
    METHODS,
    MODELS,
    UsageError,
    cache_dir,
    fit_verdict,
)

# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------


def _add_fit_flags(f, methods) -> None:
    """The flags ``fit`` and ``backtest`` share: model, method, data, fitting options."""
    f.add_argument("--model", choices=MODELS, default="lds")
    f.add_argument("--method", choices=methods, default="em")
    src = f.add_argument_group("data")
    src.add_argument("--data", default=None, help="a .csv/.tsv/.txt or .npz file")
    src.add_argument(
        "--dataset",
        choices=("nile", "sunspots", "co2", "lynx", "discoveries"),
        default=None,
        help="a series shipped with ppl_dyn instead of --data",
    )
    src.add_argument(
        "--columns",
        default=None,
        help="comma-separated observed columns (CSV) or arrays (NPZ); default: "
        "every CSV column but the time/sequence columns, NPZ array 'y'",
    )
    src.add_argument("--time-column", default=None, help="column (array) of time stamps")
    src.add_argument(
        "--sequence-column",
        default=None,
        help="CSV column labelling several equally long sequences",
    )
    src.add_argument(
        "--no-standardize",
        action="store_true",
        help="fit the raw data (default: each column centred and scaled to unit variance)",
    )
    f.add_argument("--state-dim", type=int, default=2)
    f.add_argument(
        "--num-iters",
        type=int,
        default=100,
        help="EM iterations or SGD steps (rbf: per stage; nuts: of the EM start)",
    )
    f.add_argument(
        "--rtol",
        type=float,
        default=1e-6,
        help="EM stops when the log-likelihood changes by less (relative)",
    )
    f.add_argument(
        "--e-step",
        choices=E_STEPS,
        default="auto",
        help="auto: kalman for lds, eks for tanh-rnn and rbf",
    )
    f.add_argument("--num-particles", type=int, default=200, help="--e-step particle")
    f.add_argument(
        "--num-centres",
        type=int,
        default=None,
        help="rbf: centres per state coordinate (default 11, 5 for state_dim 2, else 3)",
    )
    f.add_argument("--learning-rate", type=float, default=1e-2, help="sgd: Adam's step size")
    f.add_argument(
        "--objective",
        choices=("map", "ml"),
        default="map",
        help="map (default): maximise the log posterior with the model's priors (MAP-EM, "
        "MAP by SGD), so a short series cannot drive a covariance to zero; ml: the "
        "likelihood alone",
    )
    f.add_argument(
        "--max-spectral-radius",
        default="auto",
        help="bound on the spectral radius of the dynamics' linear part in EM's M-step "
        "(bounded forecasts): a number, none, or auto (0.99 for rbf, none otherwise)",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ppl-dyn",
        description="Learn stochastic state-space models: simulate, fit (EM or NUTS), report.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate an LDS, fit it by EM, write a report")
    d.add_argument("--out", default="ppl-dyn-demo", help="output directory")
    d.add_argument("--num-steps", type=int, default=500)
    d.add_argument("--num-sequences", type=int, default=2)
    d.add_argument("--num-iters", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=workflows._demo)

    s = sub.add_parser("simulate", help="draw y and x from a built-in model, write CSV/NPZ")
    s.add_argument("--model", choices=MODELS, default="lds")
    s.add_argument("--state-dim", type=int, default=2)
    s.add_argument("--obs-dim", type=int, default=1)
    s.add_argument("--num-steps", type=int, default=200)
    s.add_argument(
        "--num-sequences",
        type=int,
        default=None,
        help="several independent sequences (adds a leading axis / a 'sequence' CSV column)",
    )
    s.add_argument(
        "--num-centres",
        type=int,
        default=None,
        help="rbf: grid points per state coordinate over [-2, 2]",
    )
    s.add_argument(
        "--params",
        default=None,
        help="NPZ of parameter values (e.g. a fit's params.npz); sites not "
        "given are drawn from their priors",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output file, .csv or .npz")
    s.set_defaults(func=workflows._simulate)

    f = sub.add_parser("fit", help="fit a model to a CSV/NPZ file or a shipped dataset")
    _add_fit_flags(f, METHODS)
    f.add_argument("--num-warmup", type=int, default=500, help="nuts")
    f.add_argument("--num-samples", type=int, default=500, help="nuts")
    f.add_argument("--num-chains", type=int, default=2, help="nuts")
    f.add_argument("--forecast-steps", type=int, default=20)
    f.add_argument("--out", default="ppl-dyn-fit", help="output directory")
    f.add_argument("--no-report", action="store_true", help="do not write report.html")
    f.set_defaults(func=workflows._fit)

    b = sub.add_parser(
        "backtest",
        help="fit on all but a held-out tail, then score rolling-origin forecasts on it",
    )
    _add_fit_flags(b, ("em", "sgd"))
    b.add_argument(
        "--holdout",
        type=int,
        required=True,
        help="time steps at the end kept out of the fit; forecasts are made from every "
        "origin from the end of the fitted span on",
    )
    b.add_argument("--horizons", default="1,5,10", help="steps ahead, comma-separated")
    b.add_argument("--level", type=float, default=0.9, help="the prediction interval")
    b.add_argument("--num-paths", type=int, default=1000, help="simulated paths per origin")
    b.add_argument("--out", default="ppl-dyn-backtest", help="output directory")
    b.set_defaults(
        func=workflows._backtest, num_warmup=1, num_samples=1, num_chains=1, forecast_steps=1
    )

    rp = sub.add_parser("report", help="render DIR/report.html from a run directory")
    rp.add_argument("dir", help="a directory written by `ppl-dyn fit` or `ppl-dyn demo`")
    rp.set_defaults(func=workflows._report)

    r = sub.add_parser("reproduce", help="reproduce a seed paper's experiment")
    r.add_argument(
        "name",
        choices=["unkelbach", "ghahramani", "comparison"],
        help="unkelbach: seed 000 (particle EM, tanh-RNN); ghahramani: seed 001 (EKS + RBF); "
        "comparison: issue 6 study (LDS/tanh-RNN/RBF by EM vs RNN/LSTM by BPTT)",
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
    r.add_argument(
        "--small",
        action="store_true",
        help="comparison: tiny data and few iterations, one seed (smoke test)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=workflows._reproduce)

    b = sub.add_parser(
        "bench",
        help="run every benchmark script (needs a source checkout and the bench extra) and "
        "write one Markdown table of our times against the anchors",
    )
    b.add_argument("--quick", action="store_true", help="smoke-size runs of every script")
    b.add_argument("--only", default=None, help="run only the scripts whose name contains this")
    b.add_argument("--out", default=None, help="the table (default benchmarks/results.md)")
    b.set_defaults(func=workflows._bench)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command in ("demo", "simulate"):
            if args.num_steps < 2:
                raise UsageError("--num-steps must be >= 2")
            if args.command == "demo" and args.num_iters < 1:
                raise UsageError("--num-iters must be >= 1")
            if args.command == "simulate" and (
                args.state_dim < 1
                or args.obs_dim < 1
                or (args.num_sequences is not None and args.num_sequences < 1)
            ):
                raise UsageError("--state-dim, --obs-dim and --num-sequences must be >= 1")
        if args.command not in ("report", "bench"):
            # the process is ours: keep the particle E-steps' large freed blocks mapped
            keep_freed_memory()
        return args.func(args)
    except UsageError as err:
        print(f"ppl-dyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppl-dyn {args.command}: interrupted; nothing written", file=sys.stderr)
        return INTERRUPTED
    except OSError as err:  # e.g. an --out in a directory we may not write
        where = err.filename or "the output directory"
        print(f"ppl-dyn {args.command}: error: cannot write {where}: {err.strerror or err}",
              file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
