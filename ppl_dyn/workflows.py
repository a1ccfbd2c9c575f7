"""What the command-line commands do: ``demo``, ``simulate``, ``fit``, ``backtest``,
``report``, ``reproduce`` and ``bench`` (:mod:`ppl_dyn.cli` parses the arguments and
calls these; this module never imports it).

Every run writes into a fresh temporary directory next to ``--out`` and moves it into
place only when everything is written, so a failed run leaves nothing behind. Problems
with the input print one line on stderr and exit with status 2 (:class:`UsageError`)
before any output is created. See ``docs/cli.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

_STARTED = time.perf_counter()  # the CLI's clock: start-up is measured from here

MODELS = ("lds", "tanh-rnn", "rbf")
METHODS = ("em", "nuts", "sgd")
E_STEPS = ("auto", "kalman", "eks", "particle")
#: figure files of a run, in the order the report shows them
FIGURES = (
    "data.png",
    "fit.png",
    "states.png",
    "forecast.png",
    "em_curve.png",
    "sgd_curve.png",
    "trace.png",
)


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# output directories: staged, then moved into place
# --------------------------------------------------------------------------------------


def _check_out_dir(out: Path) -> None:
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{out}: {parent} is not a directory")
            break
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / "metrics.json").is_file():
            raise UsageError(
                f"{out}: exists and is not a ppl-dyn run directory (no metrics.json); "
                "choose another --out"
            )


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a temporary directory beside ``out``; on success it replaces ``out``
    (an earlier run directory there is removed), on failure it is deleted, together
    with any parent directories created for it."""
    out = Path(out)
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
            os.replace(out, old / "run")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _remove_stale_staging(out: Path) -> None:
    """Delete the staging folders ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` left beside
    ``out`` by runs that were killed (their process no longer exists); those of a run
    still going are kept."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        parts = p.name[len(out.name) + 2 :].split("-")
        if len(parts) < 2 or parts[0] not in ("tmp", "old") or not p.is_dir():
            continue
        try:
            pid = int(parts[1])
        except ValueError:  # an older run's name without a pid: no owner to ask
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def cache_dir() -> Optional[Path]:
    """Where the CLI keeps JAX's persistent compilation cache: ``$PPL_DYN_CACHE_DIR``
    (``off`` or empty: no cache), else ``$XDG_CACHE_HOME/ppl_dyn/xla``, else
    ``~/.cache/ppl_dyn/xla``. Programs compiled by one command are loaded, not compiled,
    by the next one with the same shapes (a second ``simulate`` or ``fit`` of the same
    size starts seconds sooner)."""
    env = os.environ.get("PPL_DYN_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ppl_dyn" / "xla"


def _enable_x64():
    import jax

    jax.config.update("jax_enable_x64", True)
    where = cache_dir()
    if where is not None:
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError:
            where = None  # an unwritable cache is no reason to stop: compile instead
    if where is not None and os.access(where, os.W_OK):
        jax.config.update("jax_compilation_cache_dir", str(where))
        # keep what took a while to compile, whatever its size
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _command_line(argv) -> str:
    return "ppl-dyn " + " ".join(shlex.quote(a) for a in argv)


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _demo(args) -> int:
    out = Path(args.out)
    _check_out_dir(out)
    with staged_dir(out) as tmp:
        _demo_into(args, tmp)
    print(
        f"report: {out / 'report.html'} (figure {out / 'demo.png'}, metrics {out / 'metrics.json'})"
    )
    return 0


def _demo_into(args, out: Path) -> None:
    jax = _enable_x64()
    import jax.numpy as jnp
    import numpy as np

    import ppl_dyn
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds
    from ppl_dyn.plots import demo_figure

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
    k_sim, k_fit, k_id = jax.random.split(key, 3)
    sim = ppl_dyn.simulate(k_sim, lds, true, num_steps=T, num_sequences=S, state_dim=dx, obs_dim=dy)
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
    fig_path = out / "demo.png"
    demo_figure(fig_path, y[0], recon_mean, recon_sd, x[0], states_mean, states_sd, lls, ll_true)
    idata = ppl_dyn.to_inference_data(result, model=lds, log_likelihood=False, y=y, state_dim=dx)
    _add_log_likelihood(idata, post, y)  # from the smoother above
    idata.to_netcdf(str(out / "idata.nc"))
    metrics = {
        "command": _command_line(args.argv),
        "kind": "demo",
        "model": "lds",
        "method": "em",
        "e_step": "kalman",
        "data": "simulated (demo)",
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
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "params.json", params_out)
    _save_npz(out / "params.npz", result.params)
    from ppl_dyn.report import render_report

    render_report(out, display_name=str(args.out))
    print(
        f"EM: {result.num_iters} iterations in {fit_seconds:.2f} s "
        f"(converged: {result.converged}, monotone: {monotone})"
    )
    print(f"log p(y): fitted {ll_fit:.3f}   true parameters {ll_true:.3f}")
    print("eigenvalues of A: true " + _fmt(eig_true) + "   fitted " + _fmt(eig_fit))


def _fmt(eigs):
    return "[" + ", ".join(f"{e.real:.3f}{e.imag:+.3f}j" for e in eigs) + "]"


# --------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------


def _model_fn(name: str):
    from ppl_dyn import models

    return {"lds": models.lds, "tanh-rnn": models.tanh_rnn, "rbf": models.rbf}[name]


def _default_num_centres(state_dim: int) -> int:
    return {1: 11, 2: 5}.get(state_dim, 3)


def _load_params_file(path: Path) -> dict:
    import numpy as np

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=float) for k in z.files}
    except Exception as err:  # noqa: BLE001 - any unreadable archive
        raise UsageError(
            f"{path}: not a readable NPZ archive of parameters ({type(err).__name__})"
        ) from None


def _simulate(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".npz"):
        raise UsageError(f"{out}: --out must end in .csv or .npz")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; --out names a .csv or .npz file")
    given = {}
    if args.params:
        given = _load_params_file(Path(args.params))
    jax = _enable_x64()
    import numpy as np

    import ppl_dyn

    model = _model_fn(args.model)
    centres = widths = None
    if "centres" in given:
        centres, widths = given.pop("centres"), given.pop("widths", None)
        if widths is None:
            raise UsageError(f"{args.params}: has 'centres' but no 'widths'")
    dx = args.state_dim
    dy = args.obs_dim
    if "A" in given:
        dx = int(given["A"].shape[0])
    if "C" in given:
        dy = int(given["C"].shape[0])
    kw = {"state_dim": dx, "obs_dim": dy}
    if args.model == "rbf":
        if centres is None:
            lo = np.full((1, dx), -2.0)
            nc = args.num_centres or _default_num_centres(dx)
            centres, widths = ppl_dyn.models.rbf_grid(np.concatenate([lo, -lo]), nc, coverage=1.0)
        kw.update(centres=np.asarray(centres), widths=np.asarray(widths))
    params = {k: v for k, v in given.items() if not k.startswith("_")}
    try:
        sim = ppl_dyn.simulate(
            jax.random.key(args.seed),
            model,
            params or None,
            num_steps=args.num_steps,
            num_sequences=args.num_sequences,
            **kw,
        )
    except ValueError as err:
        raise UsageError(f"cannot simulate: {err}") from None
    y, x = np.asarray(sim["y"]), np.asarray(sim["x"])
    t = np.arange(args.num_steps, dtype=float)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            if out.suffix.lower() == ".npz":
                arrays = {"y": y, "x": x, "time": t}
                arrays.update({f"param_{k}": np.asarray(v) for k, v in sim["params"].items()})
                if centres is not None:
                    arrays.update(
                        param_centres=np.asarray(centres), param_widths=np.asarray(widths)
                    )
                np.savez(f, **arrays)
            else:
                f.write(_simulation_csv(t, y, x).encode())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    shape = "x".join(str(s) for s in y.shape)
    print(f"simulated {args.model}: y {shape}, state_dim={dx}; wrote {out}")
    return 0


def _simulation_csv(t, y, x) -> str:
    batched = y.ndim == 3
    ys, xs = (y, x) if batched else (y[None], x[None])
    dy, dx = ys.shape[-1], xs.shape[-1]
    head = ["t"] + (["sequence"] if batched else [])
    # the true states are named latent_*: never read back as data by default (ppl_dyn.io)
    head += [f"y{i}" for i in range(dy)] + [f"latent_x{i}" for i in range(dx)]
    lines = [",".join(head)]
    for s in range(ys.shape[0]):
        for i, ti in enumerate(t):
            row = [f"{ti:g}"] + ([str(s)] if batched else [])
            row += [repr(float(v)) for v in ys[s, i]] + [repr(float(v)) for v in xs[s, i]]
            lines.append(",".join(row))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------


def _load_data(args):
    from ppl_dyn.io import DataError, Series, check_series, load_series

    dx = args.state_dim
    min_steps = max(10, dx + 3)
    if (args.data is None) == (args.dataset is None):
        raise UsageError("give exactly one of --data FILE and --dataset NAME")
    if args.dataset is not None:
        import numpy as np

        from ppl_dyn import datasets

        if args.columns or args.time_column or args.sequence_column:
            raise UsageError("--columns/--time-column/--sequence-column apply to --data files")
        ds = datasets.load(args.dataset)
        time_name = "year"  # every shipped series (co2: decimal years)
        series = Series(
            np.asarray(ds.y, float),
            np.asarray(ds.time, float),
            (ds.name,),
            f"dataset:{ds.name}",
            time_name,
        )
        try:
            return check_series(series, min_steps=min_steps, time_name=time_name), ds.units
        except DataError as err:
            raise UsageError(str(err)) from None
    try:
        return load_series(
            args.data,
            columns=args.columns,
            time_column=args.time_column,
            sequence_column=args.sequence_column,
            min_steps=min_steps,
        ), ""
    except DataError as err:
        raise UsageError(str(err)) from None


def _data_line(series) -> str:
    """One line saying what was read: steps, sequences, columns, time axis and what the
    reader decided on its own (``Series.notes``)."""
    y = series.y
    shape = f"{y.shape[0]} sequences of " if y.ndim == 3 else ""
    line = f"data: {series.source}: {shape}{y.shape[-2]} steps, columns {', '.join(series.names)}"
    if not any(n.startswith("time axis") for n in series.notes):  # else a note says it
        line += f"; time axis {series.time_name!r}"
    return line + "".join(f"; {n}" for n in series.notes)


def _standardise(series, enabled: bool, fit_steps=None):
    """``(y, mean, scale)``: each column centred and scaled by its first ``fit_steps``
    steps (all by default; :func:`ppl_dyn.standardize`), or unchanged (mean 0, scale 1)
    with ``--no-standardize``. A constant column is a usage error naming it."""
    import numpy as np

    from ppl_dyn.io import DataError
    from ppl_dyn.preprocess import standardize

    span = series.y[..., : series.y.shape[-2] if fit_steps is None else fit_steps, :]
    flat = span.reshape(-1, span.shape[-1])
    for j, name in enumerate(series.names):
        if not np.nanstd(flat[:, j]) > 0:
            raise UsageError(str(DataError(series.source, f"column {name!r} is constant")))
    st = standardize(series.y, fit_steps=fit_steps)
    if not enabled:
        return series.y, np.zeros_like(st.mean), np.ones_like(st.scale)
    return st.y, st.mean, st.scale


def _check_fit_args(args) -> None:
    if args.state_dim < 1:
        raise UsageError("--state-dim must be >= 1")
    if args.num_iters < 1:
        raise UsageError("--num-iters must be >= 1")
    if args.forecast_steps < 1:
        raise UsageError("--forecast-steps must be >= 1")
    if args.num_particles < 2:
        raise UsageError("--num-particles must be >= 2")
    if min(args.num_warmup, args.num_samples, args.num_chains) < 1:
        raise UsageError("--num-warmup, --num-samples and --num-chains must be >= 1")
    if args.num_centres is not None and args.num_centres < 2:
        raise UsageError("--num-centres must be >= 2")
    if args.e_step == "kalman" and args.model != "lds":
        raise UsageError("--e-step kalman is exact only for --model lds; use eks or particle")
    if args.method == "nuts" and args.e_step == "particle":
        raise UsageError(
            "--method nuts needs a deterministic, differentiable E-step "
            "(kalman or eks), not particle"
        )
    if args.method == "sgd":
        if args.e_step == "particle":
            raise UsageError(
                "--method sgd needs a deterministic, differentiable E-step "
                "(kalman or eks), not particle"
            )
        if not args.learning_rate > 0:
            raise UsageError("--learning-rate must be > 0")
        import ppl_dyn.infer as infer

        if not hasattr(infer, "SGD"):
            raise UsageError(
                "--method sgd is not available in this version of ppl_dyn "
                "(ppl_dyn.infer.SGD is missing); use --method em or nuts"
            )


def _e_step_name(args) -> str:
    if args.e_step != "auto":
        return args.e_step
    return "kalman" if args.model == "lds" else "eks"


def _e_step_obj(name: str, num_particles: int):
    from ppl_dyn.infer import ExtendedKalmanSmoother, KalmanSmoother, ParticleSmoother

    if name == "kalman":
        return KalmanSmoother()
    if name == "eks":
        return ExtendedKalmanSmoother()
    return ParticleSmoother(num_particles=num_particles)


class Phases:
    """Wall-clock seconds of a command's phases, each from the end of the previous one
    (the first from the CLI module's import), reported in ``metrics.json`` as
    ``seconds`` so that a slow start can be traced to its part."""

    def __init__(self):
        self.seconds: dict = {}
        self._last = _STARTED

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def _fit(args) -> int:
    phases = Phases()
    _check_fit_args(args)
    _max_spectral_radius(args)
    series, units = _load_data(args)
    yz, mean, scale = _standardise(series, not args.no_standardize)
    out = Path(args.out)
    _check_out_dir(out)
    print(_data_line(series))
    phases.mark("start and read the data")
    import numpy as np

    try:
        with staged_dir(out) as tmp:
            metrics = _fit_into(args, series, units, yz, mean, scale, tmp, phases)
            if not args.no_report:
                from ppl_dyn.report import render_report

                render_report(tmp, display_name=str(out))
                phases.mark("report")
                metrics["seconds"] = phases.seconds
                _write_json(tmp / "metrics.json", _finite_or_none(metrics))
    except (FloatingPointError, np.linalg.LinAlgError) as err:
        # numerical failure of the fit itself: nothing was written (staged_dir)
        msg = " ".join(str(err).split())
        print(
            f"ppl-dyn fit: the fit failed, nothing written: {type(err).__name__}: {msg}",
            file=sys.stderr,
        )
        return 1
    ll = metrics.get("log_marginal_final")
    msg = f"ran {args.model} by {args.method}"
    if ll is not None and metrics.get("log_marginal_initial") is not None:
        msg += (
            f": log p(y) {metrics['log_marginal_initial']:.3f} (start) -> "
            f"{ll:.3f} (end, standardised data)"
        )
    elif ll is not None:
        msg += f": log p(y) {ll:.3f} (end, standardised data)"
    print(msg)
    what = "report.html" if not args.no_report else "metrics.json"
    print(f"report: {out / what}")
    verdict = metrics.get("verdict") or fit_verdict(metrics)
    print(verdict["line"])  # the last line: the verdict, in plain words
    return 0 if verdict["ok"] else FIT_FAILED


def _backtest(args) -> int:
    """``ppl-dyn backtest``: fit on all but the last ``--holdout`` steps (standardised
    with the fitted span's statistics only), then forecast every held-out target from
    every origin with ``ppl_dyn.backtest`` and score it against a naive forecast."""
    _check_fit_args(args)
    _max_spectral_radius(args)  # a bad value is a usage error before anything runs
    try:
        horizons = sorted({int(h) for h in args.horizons.split(",")})
    except ValueError:
        raise UsageError(
            f"--horizons must be comma-separated ints; got {args.horizons!r}"
        ) from None
    if not horizons or horizons[0] < 1:
        raise UsageError("--horizons must be positive")
    if not 0.0 < args.level < 1.0:
        raise UsageError("--level must be in (0, 1)")
    if args.num_paths < 2:
        raise UsageError("--num-paths must be >= 2")
    series, units = _load_data(args)
    T = series.y.shape[-2]
    train = T - args.holdout
    min_steps = max(10, args.state_dim + 3)
    if args.holdout < horizons[0] or train < min_steps:
        raise UsageError(
            f"--holdout must be in [{horizons[0]}, {T - min_steps}] for {T} time steps "
            f"(at least {min_steps} to fit, and one target {horizons[0]} steps ahead)"
        )
    yz, mean, scale = _standardise(series, not args.no_standardize, fit_steps=train)
    out = Path(args.out)
    _check_out_dir(out)
    print(_data_line(series) + f"; fitted on the first {train} steps, {args.holdout} held out")
    with staged_dir(out) as tmp:
        scores = _backtest_into(args, series, yz, mean, scale, train, horizons, tmp)
    print(_backtest_table(scores, horizons, args.level))
    print(f"backtest: {out / 'backtest.json'}")
    return 0


def _backtest_into(args, series, yz, mean, scale, train, horizons, out: Path) -> dict:
    jax = _enable_x64()
    import numpy as np

    import ppl_dyn
    from ppl_dyn import plots
    from ppl_dyn.infer import ExtendedKalmanSmoother

    model = _model_fn(args.model)
    e_name = _e_step_name(args)
    k_fit, k_bt = jax.random.split(jax.random.key(args.seed))
    res, kw, _, _, _ = _em_fit(args, model, yz[..., :train, :], k_fit, e_name)
    kw = {**kw, "y": yz}
    bt = ppl_dyn.backtest(
        res.params,
        model,
        horizons=horizons,
        start=train - 1,
        level=args.level,
        num_paths=args.num_paths,
        num_particles=max(args.num_particles, 1000),
        e_step=ExtendedKalmanSmoother() if e_name == "eks" else None,
        rng_key=k_bt,
        **kw,
    )
    y = np.asarray(series.y, float)
    batched = y.ndim == 3
    yb = y if batched else y[None]
    T = yb.shape[1]
    origins = bt.origins
    result = {"model": args.model, "method": args.method, "objective": args.objective,
              "e_step": e_name, "filter": bt.filter, "data": series.source,
              "columns": list(series.names), "num_steps": T, "fitted_steps": train,
              "holdout": args.holdout, "level": args.level, "num_paths": args.num_paths,
              "horizons": horizons, "scores": {}, "naive": {}}  # fmt: skip
    for k in horizons:
        target = np.full_like(yb, np.nan)
        target[:, : T - k] = yb[:, k:]
        tg = target[:, origins]  # (S, n_origins, dy), original units

        def orig(a):
            a = np.asarray(a)
            return (a if batched else a[None]) * scale + mean

        m, md, lo, hi = (orig(getattr(bt, f)[k]) for f in ("mean", "median", "lower", "upper"))
        crps = (np.asarray(bt.crps[k]) if batched else np.asarray(bt.crps[k])[None]) * scale
        seen = np.isfinite(tg)
        n = int(seen.sum())
        if n == 0:
            continue
        err, err_md = (m - tg)[seen], (md - tg)[seen]
        inside = ((tg >= lo) & (tg <= hi))[seen]
        result["scores"][str(k)] = {
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "mae_median": float(np.mean(np.abs(err_md))),
            "crps": float(np.mean(crps[seen])),
            "coverage": float(np.mean(inside)),
            "n": n,
        }
        # naive forecast: the last value seen at the origin (a point forecast: CRPS = MAE)
        last = yb[:, origins]
        ok = seen & np.isfinite(last)
        e0 = (last - tg)[ok]
        result["naive"][str(k)] = {
            "rmse": float(np.sqrt(np.mean(e0**2))),
            "mae": float(np.mean(np.abs(e0))),
            "crps": float(np.mean(np.abs(e0))),
            "n": int(ok.sum()),
        }
        if k == horizons[-1]:
            t = np.asarray(series.time, float)
            t_fc = np.array([t[o + k] if o + k < T else np.nan for o in origins])
            keep = np.isfinite(t_fc)
            tail = max(0, train - 3 * args.holdout)
            plots.band_figure(
                out / "backtest.png",
                t_fc[keep],
                m[0][keep],
                lo[0][keep],
                hi[0][keep],
                list(series.names),
                y=yb[0, tail:],
                y_time=t[tail:],
                time_name=series.time_name,
                label=f"{k}-step forecast",
                title=f"{k}-step-ahead forecasts from each origin, "
                f"{100 * args.level:.0f}% band (fitted on the first {train} steps)",
            )
    _write_json(out / "backtest.json", _finite_or_none(result))
    (out / "backtest.md").write_text(_backtest_table(result, horizons, args.level) + "\n")
    return result


def _backtest_table(result: dict, horizons, level: float) -> str:
    rows = [
        f"| horizon | RMSE | MAE | MAE (median) | CRPS | {100 * level:.0f}% coverage | n "
        "| naive RMSE | naive MAE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in horizons:
        s, b = result["scores"].get(str(k)), result["naive"].get(str(k))
        if s is None:
            continue
        rows.append(
            f"| {k} | {s['rmse']:.4g} | {s['mae']:.4g} | {s['mae_median']:.4g} | "
            f"{s['crps']:.4g} | {s['coverage']:.3f} | {s['n']} | {b['rmse']:.4g} | "
            f"{b['mae']:.4g} |"
        )
    return "\n".join(rows)


FIT_FAILED = 3  # exit status of a fit that ran but failed its checks (docs/cli.md)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def fit_verdict(metrics: dict) -> dict:
    """Did the fit work? ``{"ok", "line", "reasons"}`` from the run's metrics:

    * every number a user reads (final log-likelihood, data scale, forecast, predictive
      RMSE) is finite;
    * EM and SGD end at least as high as they started in what they maximise (log p(y)
      of the standardised data, plus log p(theta) with ``--objective map``; SGD reports
      its best iterate);
    * NUTS passes its diagnostics: split R-hat < 1.01, bulk and tail ESS >= 100 per
      chain, no divergence, E-BFMI >= 0.3 (hitting the maximum tree depth is reported,
      not failed: it costs time, not correctness).
    """
    import numpy as np

    reasons = []
    for key in ("log_marginal_final", "data_scale", "forecast_mean_last",
                "posterior_predictive_rmse"):  # fmt: skip
        if key in metrics:
            vals = np.asarray(metrics[key], dtype=float) if metrics[key] is not None else None
            if vals is None or not np.all(np.isfinite(vals)):
                reasons.append(f"{key} is not finite")
    method = metrics.get("method")
    # what the fit maximised: log p(y), or log p(y) + log p(theta) with --objective map
    start = metrics.get("objective_initial", metrics.get("log_marginal_initial"))
    end = metrics.get("objective_final", metrics.get("log_marginal_final"))
    name = "log p(y) + log p(theta)" if metrics.get("objective") == "map" else "log p(y)"
    if method in ("em", "sgd") and start is not None and end is not None:
        if np.isfinite(start) and np.isfinite(end) and end < start - 1e-6 * (1 + abs(start)):
            reasons.append(
                f"{name} ended below its start ({start:.3f} -> {end:.3f}): the fit made the "
                "model worse (lower the learning rate, or use --method em)"
            )
    steps = len(metrics.get("log_marginals") or [])
    if method == "sgd" and metrics.get("best_step") == 0 and steps > 1:
        reasons.append(
            "SGD never improved on its starting values (every step made log p(y) worse: "
            "lower --learning-rate)"
        )
    if method == "nuts":
        for p in metrics.get("diagnostic_problems") or []:
            if "maximum tree depth" not in p:
                reasons.append(p.split(":")[0])
    if reasons:
        line = "verdict: FIT FAILED: " + "; ".join(reasons)
    else:
        what = {"em": "EM", "sgd": "SGD", "nuts": "NUTS"}.get(method, method)
        line = f"verdict: fit OK ({what}"
        if method in ("em", "sgd") and end is not None:
            line += f", {name} {start:.3f} -> {end:.3f})"
        elif method == "nuts":
            line += f", R-hat {metrics.get('max_rhat', float('nan')):.3f}, min bulk ESS "
            line += f"{metrics.get('min_ess_bulk', float('nan')):.0f}, no divergence)"
        else:
            line += ")"
    return {"ok": not reasons, "line": line, "reasons": reasons}


def _max_spectral_radius(args):
    """``--max-spectral-radius``: ``auto`` is 0.99 for rbf (whose linear part acts
    outside the centres) and none for lds and tanh-rnn (bounded features)."""
    value = str(args.max_spectral_radius).strip().lower()
    if value == "auto":
        return 0.99 if args.model == "rbf" and args.method != "sgd" else None
    if value == "none":
        return None
    try:
        radius = float(value)
    except ValueError:
        radius = float("nan")
    if not radius > 0:
        raise UsageError(f"--max-spectral-radius must be > 0, auto or none; got {value!r}")
    if args.method == "sgd":
        raise UsageError("--max-spectral-radius applies to EM's M-step, not --method sgd")
    return radius


def _em_fit(args, model, yz, key, e_name):
    """EM (or, with ``--method sgd``, Adam on the marginal likelihood) for the chosen
    model; returns (result, model kwargs, curve stages, extra metrics, initial log p(y))."""
    import numpy as np

    from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, fit_nested
    from ppl_dyn.infer.nested import factor_analysis_init
    from ppl_dyn.models import lds, rbf_grid

    dx, pb = args.state_dim, not args.quiet
    kw = {"y": yz, "state_dim": dx}
    use_map = args.objective == "map"
    radius = _max_spectral_radius(args)
    m_step = LinearGaussianMStep(map_estimate=use_map, max_spectral_radius=radius)
    e_step = _e_step_obj(e_name, args.num_particles)
    if args.method == "sgd":
        import jax
        import optax

        from ppl_dyn.infer import SGD

        init = factor_analysis_init(yz, state_dim=dx)
        stages, extra, ll0 = None, {}, None
        if args.model == "rbf":  # centres over the states of an LDS fit, start from it
            k_lds, key = jax.random.split(key)
            lds_fit = EM(lds, KalmanSmoother(), m_step._replace(max_spectral_radius=None)).run(
                k_lds, args.num_iters, init=init, rtol=args.rtol, progress_bar=pb, **kw
            )
            post = KalmanSmoother().smooth(lds_fit.params, lds, **kw)
            nc = args.num_centres or _default_num_centres(dx)
            centres, widths = rbf_grid(np.asarray(post.means), nc)
            kw.update(centres=np.asarray(centres), widths=np.asarray(widths))
            init, ll0 = lds_fit, lds_fit.log_marginals[0]
            stages = [("LDS (EM, Kalman)", lds_fit.objective)]
            extra = {"num_centres": int(centres.shape[0])}
        res = SGD(model, e_step, optax.adam(args.learning_rate), map_estimate=use_map).run(
            key, args.num_iters, init=init, rtol=args.rtol, progress_bar=pb, **kw
        )
        if stages:
            stages.append((f"RBF (Adam, {e_name.upper()})", res.log_marginals))
        return res, kw, stages, extra, res.log_marginals[0] if ll0 is None else ll0
    if args.model == "rbf":
        nc = args.num_centres or _default_num_centres(dx)
        nested = fit_nested(
            key,
            y=yz,
            state_dim=dx,
            num_centres=nc,
            lds_iters=args.num_iters,
            rbf_iters=args.num_iters,
            rbf_e_step=e_step,
            progress_bar=pb,
            map_estimate=use_map,
            max_spectral_radius=radius,
        )
        kw.update(centres=np.asarray(nested.centres), widths=np.asarray(nested.widths))
        stages = [  # what each stage maximised (the log posterior with MAP-EM)
            ("LDS (Kalman)", nested.lds.objective),
            (f"RBF ({e_name.upper()})", nested.rbf.objective),
        ]
        extra = {
            "num_centres": int(nested.centres.shape[0]),
            "lds_stage_log_marginals": [float(v) for v in nested.lds.log_marginals],
        }
        return nested.rbf, kw, stages, extra, nested.lds.log_marginals[0]
    init = factor_analysis_init(yz, state_dim=dx)
    rtol = None if e_name == "particle" else args.rtol
    res = EM(model, e_step, m_step).run(
        key, args.num_iters, init=init, rtol=rtol, progress_bar=pb, **kw
    )
    return res, kw, None, {}, res.log_marginals[0]


def _fit_into(args, series, units, yz, mean, scale, out: Path, phases: Phases) -> dict:
    jax = _enable_x64()
    import numpy as np

    import ppl_dyn
    from ppl_dyn import plots
    from ppl_dyn.infer import ExtendedKalmanSmoother, KalmanSmoother

    model = _model_fn(args.model)
    e_name = _e_step_name(args)
    # the Gaussian smoother used for predictive bands, forecasts and ArviZ's
    # one-step-ahead log-likelihood (a particle E-step has no filtered moments)
    gauss = KalmanSmoother() if e_name == "kalman" else ExtendedKalmanSmoother()
    k_fit, k_mc, k_pp, k_fc, k_id, k_sm = jax.random.split(jax.random.key(args.seed), 6)
    phases.mark("import JAX, NumPyro, ppl_dyn")
    t0 = time.perf_counter()
    res, kw, stages, extra, ll_init = _em_fit(args, model, yz, k_fit, e_name)
    em_seconds = time.perf_counter() - t0
    phases.mark("fit (EM start)" if args.method == "nuts" else "fit (compile and run)")
    lls = np.asarray(res.log_marginals)
    site_names = sorted(res.params)
    metrics = {
        "command": _command_line(args.argv),
        "kind": "fit",
        "model": args.model,
        "method": args.method,
        "e_step": e_name,
        "data": series.source,
        "columns": list(series.names),
        "time_axis": series.time_name,
        "data_notes": list(series.notes),
        "units": units,
        "num_sequences": int(yz.shape[0]) if yz.ndim == 3 else 1,
        "num_steps": int(yz.shape[-2]),
        "obs_dim": int(yz.shape[-1]),
        "state_dim": args.state_dim,
        "num_missing": int(np.sum(np.isnan(yz))),
        "standardized": not args.no_standardize,
        "data_mean": mean.tolist(),
        "data_scale": scale.tolist(),
        "seed": args.seed,
        **extra,
    }
    if args.method in ("em", "sgd"):
        source = res
        smooth_e = _e_step_obj(e_name, args.num_particles)
        post = smooth_e.smooth(res.params, model, rng_key=k_sm, **kw)
        ll_final = float(np.sum(np.asarray(post.log_marginal)))
        # EM's objective: log p(y) + log p(theta) with --objective map (SGD's curve
        # includes the prior already)
        obj = np.asarray(getattr(res, "objective", lls)) if args.method == "em" else lls
        monotone = bool(np.all(np.diff(obj) >= -1e-8 * np.abs(obj[:-1])))
        it_name = "em_iterations" if args.method == "em" else "sgd_steps"
        metrics.update(
            {
                it_name: int(res.num_iters),
                "converged": bool(res.converged),
                "fit_seconds": em_seconds,
                # SGD's curve with --objective map is the log posterior: log p(y) alone
                # at its start is not known (the verdict uses the objective)
                "log_marginal_initial": (
                    None if args.method == "sgd" and args.objective == "map" else float(ll_init)
                ),
                "log_marginal_final": ll_final,
                "log_marginals": [float(v) for v in lls],
                "objective": args.objective,
                "max_spectral_radius": _max_spectral_radius(args),
                "objective_initial": float(obj[0]),
                # at the returned parameters (SGD returns its best iterate)
                "objective_final": float(obj[-1] if args.method == "em" else np.max(obj)),
            }
        )
        if args.method == "em":
            metrics["em_monotone"] = monotone
            metrics["covariance_floor_counts"] = {k: int(v) for k, v in res.floor_counts.items()}
        else:
            metrics["learning_rate"] = args.learning_rate
            metrics["best_step"] = int(np.argmax(lls))  # the iterate SGD returns
        params = dict(res.params)
        state_mean, state_sd = _state_bands(post)
    else:  # nuts, started from the EM fit
        source, idata, params, state_mean, state_sd, nuts_metrics = _nuts(
            args, model, gauss, res, kw, k_mc, site_names
        )
        metrics.update(
            {
                "em_iterations_for_init": int(res.num_iters),
                "log_marginal_initial": float(ll_init),
                "log_marginal_em": float(lls[-1]),
                **nuts_metrics,
            }
        )
        post = gauss.smooth(params, model, **kw)
        metrics["log_marginal_final"] = float(np.sum(np.asarray(post.log_marginal)))
    model_kw = {k: v for k, v in kw.items() if k != "y"}

    # predictive bands (standardised units) -> original units
    level = 0.95
    if args.method == "nuts":  # replicated data under parameter uncertainty
        pp = ppl_dyn.posterior_predictive(k_pp, source, e_step=gauss, level=level)
        fc = ppl_dyn.forecast(k_fc, source, args.forecast_steps, e_step=gauss, level=level)
        pp_mean, pp_lo, pp_hi = pp.mean, pp.lower, pp.upper
    else:
        pp_mean, pp_lo, pp_hi = _em_predictive_band(args.seed, args.model, params, post, level)
        fc = ppl_dyn.forecast(
            k_fc,
            source,
            args.forecast_steps,
            model=model,
            e_step=gauss,
            level=level,
            num_paths=500,
            **kw,
        )

    def orig(a):
        a = np.asarray(a)
        return (a[0] if a.ndim == 3 else a) * scale + mean

    y_orig = orig(yz)
    phases.mark("NUTS, smoother, predictive bands and forecast")
    t = series.time
    dt = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    t_fc = t[-1] + dt * np.arange(1, args.forecast_steps + 1)
    y_rmse = float(np.sqrt(np.nanmean((orig(pp_mean) - y_orig) ** 2)))
    seen = np.isfinite(y_orig)  # coverage of the observed entries only
    inside = (y_orig >= orig(pp_lo)) & (y_orig <= orig(pp_hi))
    cover = np.mean(inside[seen])
    metrics.update(
        {
            "predictive_level": level,
            "posterior_predictive_rmse": y_rmse,
            "posterior_predictive_coverage": float(cover),
            "forecast_steps": args.forecast_steps,
            "forecast_mean_last": orig(fc.mean)[-1].tolist(),
        }
    )

    names = list(series.names)
    tn = series.time_name
    S = metrics["num_sequences"]
    note = f" (sequence 1 of {S})" if S > 1 else ""
    plots.data_figure(out / "data.png", t, y_orig, names, tn, title=f"data: {series.source}{note}")
    plots.band_figure(
        out / "fit.png",
        t,
        orig(pp_mean),
        orig(pp_lo),
        orig(pp_hi),
        names,
        y=y_orig,
        y_time=t,
        time_name=tn,
        label="posterior predictive",
        title=f"fit: posterior predictive {100 * level:.0f}% band{note}",
    )
    plots.band_figure(
        out / "states.png",
        t,
        state_mean,
        state_mean - 2 * state_sd,
        state_mean + 2 * state_sd,
        [f"x[{i}]" for i in range(state_mean.shape[1])],
        time_name=tn,
        label="smoothed",
        title="smoothed states ± 2 sd (standardised units; "
        f"the state basis is not identified){note}",
    )
    tail = max(0, len(t) - 4 * args.forecast_steps)
    plots.band_figure(
        out / "forecast.png",
        t_fc,
        orig(fc.mean),
        orig(fc.lower),
        orig(fc.upper),
        names,
        y=y_orig[tail:],
        y_time=t[tail:],
        time_name=tn,
        label="forecast",
        title=f"forecast of {args.forecast_steps} steps, {100 * level:.0f}% band{note}",
    )
    objective = "log p(y) + log p(θ)" if args.objective == "map" else "log p(y)"
    if args.method == "em":
        plots.em_curve_figure(
            out / "em_curve.png",
            np.asarray(res.objective),
            stages=stages,
            title=f"EM ({e_name} E-step): {objective}",
        )
    elif args.method == "sgd":
        plots.em_curve_figure(
            out / "sgd_curve.png",
            lls,
            stages=stages,
            xlabel="step",
            title=f"Adam on {objective} ({e_name} E-step)",
        )

    phases.mark("figures")
    # ArviZ (forecasts added from the bands above: one forecast run, not two)
    if args.method == "nuts":
        plots.trace_figure(
            out / "trace.png", idata, [k for k in site_names if k in idata.posterior]
        )
    else:
        # the one-step-ahead log-densities come from the smoother run above (no rerun)
        gpost = post if e_name != "particle" else gauss.smooth(params, model, **kw)
        idata = ppl_dyn.to_inference_data(
            source, model=model, e_step=gauss, log_likelihood=False, **kw
        )
        _add_log_likelihood(idata, gpost, yz)
    _add_forecasts(idata, fc, yz)
    for g in ("posterior", "observed_data"):
        if hasattr(idata, g):
            getattr(idata, g).attrs.update(
                data_mean=np.asarray(mean),
                data_scale=np.asarray(scale),
                ppl_dyn_model=args.model,
                ppl_dyn_method=args.method,
            )
    idata.to_netcdf(str(out / "idata.nc"))
    arrays = {k: np.asarray(v) for k, v in params.items()}
    if "centres" in model_kw:
        arrays.update(centres=model_kw["centres"], widths=model_kw["widths"])
    _save_npz(out / "params.npz", arrays)
    _write_json(out / "params.json", _finite_or_none({k: v.tolist() for k, v in arrays.items()}))
    phases.mark("ArviZ export and files")
    metrics["verdict"] = fit_verdict(metrics)
    metrics["seconds"] = phases.seconds
    _write_json(out / "metrics.json", _finite_or_none(metrics))
    return metrics


def _add_log_likelihood(idata, post, yz) -> None:
    """ArviZ's ``log_likelihood`` group from a Gaussian smoother's one-step-ahead
    log-densities ``log p(y_t | y_{1:t-1})`` (as :func:`ppl_dyn.to_inference_data` names
    it: variable ``y``, dims ``([sequence,] time)``)."""
    import arviz as az
    import numpy as np

    lp = np.asarray(post.predicted_log_probs)
    seq = ["sequence"] if yz.ndim == 3 else []
    coords = {"time": np.arange(yz.shape[-2])}
    if seq:
        coords["sequence"] = np.arange(yz.shape[0])
    idata.extend(
        az.from_dict(
            log_likelihood={"y": lp[None, None]}, coords=coords, dims={"y": seq + ["time"]}
        )
    )


def _add_forecasts(idata, fc, yz) -> None:
    import arviz as az
    import numpy as np

    T, dy = yz.shape[-2:]
    seq = ["sequence"] if yz.ndim == 3 else []
    coords = {"forecast_time": np.asarray(fc.time), "obs_dim": np.arange(dy)}
    if seq:
        coords["sequence"] = np.arange(yz.shape[0])
    dims = {"y": seq + ["forecast_time", "obs_dim"]}
    group = az.from_dict(
        predictions={"y": np.asarray(fc.samples)},
        pred_dims=dims,
        pred_coords=coords,
        coords=coords,
        dims=dims,
    )
    idata.extend(group)


def _em_predictive_band(seed: int, model_name, params, post, level, num_draws: int = 400):
    """Replicated data of a point estimate: per time step, states drawn from the smoothed
    marginal ``N(m_t, P_t)`` pushed through the emission with its noise (Monte Carlo;
    first sequence). Returns mean, lower and upper quantiles ``(T, obs_dim)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m, P = np.asarray(post.means), np.asarray(post.covs)
    if m.ndim == 3:
        m, P = m[0], P[0]
    T, dx = m.shape
    C, d = np.asarray(params["C"]), np.asarray(params.get("d", 0.0))
    R = np.asarray(params["R"])
    R = np.diag(R) if R.ndim == 1 else R
    L = np.linalg.cholesky(0.5 * (P + np.swapaxes(P, -1, -2)) + 1e-12 * np.eye(dx))
    x = m[None] + np.einsum("tij,ntj->nti", L, rng.standard_normal((num_draws, T, dx)))
    psi = np.tanh(x) if model_name == "tanh-rnn" else x
    dy = C.shape[0]
    noise = (
        rng.standard_normal((num_draws, T, dy))
        @ np.linalg.cholesky(0.5 * (R + R.T) + 1e-12 * np.eye(dy)).T
    )
    ys = psi @ C.T + d + noise
    lo, hi = np.quantile(ys, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ys.mean(0), lo, hi


def _finite_or_none(obj):
    """Replace non-finite floats by None (JSON has no NaN)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _state_bands(post):
    import numpy as np

    m, P = np.asarray(post.means), np.asarray(post.covs)
    if m.ndim == 3:
        m, P = m[0], P[0]
    return m, np.sqrt(np.maximum(np.diagonal(P, axis1=-2, axis2=-1), 0.0))


def _nuts(args, model, gauss, em_res, kw, key, site_names):
    """NUTS over the parameters with the states integrated out by ``gauss``, started
    from the EM fit; returns (mcmc, posterior-mean params, state bands, metrics)."""
    import numpy as np
    from numpyro.infer import MCMC, NUTS, init_to_value

    import ppl_dyn
    from ppl_dyn.mcmc import EXTRA_FIELDS, diagnose, em_init_values, smoothed_states

    marg = ppl_dyn.handlers.marginalize(model, e_step=gauss)
    values = em_init_values(em_res, marg, **kw)
    kernel = NUTS(marg, init_strategy=init_to_value(values=values))
    mcmc = MCMC(
        kernel,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="sequential",
        progress_bar=not args.quiet,
    )
    t0 = time.perf_counter()
    mcmc.run(key, extra_fields=EXTRA_FIELDS, **kw)
    seconds = time.perf_counter() - t0
    samples = mcmc.get_samples()
    params = {k: np.mean(np.asarray(samples[k]), 0) for k in site_names if k in samples}
    # states: mixture over draws of the smoothed Gaussians (law of total variance)
    post = smoothed_states(mcmc)
    m, P = np.asarray(post.means), np.asarray(post.covs)  # (c, d, [S,] T, dx[, dx])
    if m.ndim == 5:
        m, P = m[:, :, 0], P[:, :, 0]
    m = m.reshape((-1,) + m.shape[-2:])
    v = np.diagonal(P, axis1=-2, axis2=-1).reshape(m.shape)
    state_mean = m.mean(0)
    state_sd = np.sqrt(np.maximum(v.mean(0) + m.var(0), 0.0))
    idata = ppl_dyn.to_inference_data(mcmc)
    d = diagnose(idata, var_names=[k for k in site_names if k in samples])
    metrics = {
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
        "num_chains": args.num_chains,
        "mcmc_seconds": seconds,
        "fit_seconds": seconds,
        "max_rhat": d.max_rhat,
        "max_rhat_var": d.max_rhat_var,
        "min_ess_bulk": d.min_ess_bulk,
        "min_ess_tail": d.min_ess_tail,
        "num_divergent": d.num_divergent,
        "bfmi": None if d.bfmi is None else [float(b) for b in d.bfmi],
        "num_max_tree_depth": d.num_max_tree_depth,
        "diagnostic_problems": list(d.problems),
        "params_are": "posterior means of the parameter draws",
    }
    return mcmc, idata, params, state_mean, state_sd, metrics


# --------------------------------------------------------------------------------------
# report, reproduce
# --------------------------------------------------------------------------------------


def _report(args) -> int:
    from ppl_dyn.report import ReportError, render_report

    try:
        path = render_report(args.dir)
    except ReportError as err:
        raise UsageError(str(err)) from None
    print(f"report: {path}")
    return 0


def _reproduce(args) -> int:
    if args.num_seeds < 1 or args.num_particles < 1 or args.series_length < 20:
        raise UsageError("--num-seeds and --num-particles must be >= 1 and --series-length >= 20")
    out = Path(args.out or f"reproduce-{args.name}")
    if args.name == "comparison":
        from ppl_dyn.reproduce import comparison

        def given(flag):  # the shared flags' defaults are the other studies'
            return any(a == flag or a.startswith(flag + "=") for a in args.argv)

        default_seeds = 1 if args.small else 3
        comparison.main(
            out,
            small=args.small,
            num_seeds=args.num_seeds if given("--num-seeds") else default_seeds,
            num_particles=args.num_particles if given("--num-particles") else None,
            num_iters=args.num_iters,
        )
        return 0
    if args.name == "ghahramani":
        from ppl_dyn.reproduce import ghahramani

        ghahramani.main(
            out,
            num_seeds=args.num_seeds,
            num_steps=args.series_length,
            rbf_iters=args.num_iters or 20,
            progress_bar=not args.quiet,
        )
        return 0
    from ppl_dyn.reproduce import unkelbach

    unkelbach.main(
        out,
        num_seeds=args.num_seeds,
        num_particles=args.num_particles,
        num_iters=args.num_iters or 100,
        compare_n10=not args.no_n10,
        progress_bar=not args.quiet,
    )
    return 0


def _bench(args) -> int:
    """Runs ``benchmarks/run_all.py`` of the source checkout this package was installed
    from (editable install) or of the current directory."""
    import subprocess

    here = Path(__file__).resolve().parent.parent
    candidates = [here / "benchmarks" / "run_all.py", Path.cwd() / "benchmarks" / "run_all.py"]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise UsageError(
            "benchmarks/run_all.py not found: the benchmarks live in the source repository; "
            "run this from a checkout (pip install -e '.[bench]')"
        )
    cmd = [sys.executable, str(script)]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", args.only]
    if args.out:
        cmd += ["--out", args.out]
    return subprocess.call(cmd)
