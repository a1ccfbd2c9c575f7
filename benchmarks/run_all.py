"""Run every benchmark script and write one Markdown table: our time vs each anchor.

Run from the repository root::

    python benchmarks/run_all.py [--quick] [--out benchmarks/results.md] [--timeout S]
                                 [--only lds_em,nuts] [--json-dir DIR]
    python benchmarks/run_all.py --from-json lds_em=lds.json --from-json nuts=nuts.json

Each script (``lds_em.py``, ``particle_smoother.py``, ``eks_rbf.py``, ``nuts.py``) runs in
its own subprocess with ``--out FILE.json`` (and ``--quick`` when given), under a time
limit per script; its own progress output streams through. The JSON each script writes
is converted to rows

    {"benchmark", "case", "ours_s", "anchor", "anchor_s", "ratio", "target"}

and all rows go into one table. ``ratio`` is the speed-up ``anchor_s / ours_s``: above 1,
ppl_dyn is faster. ``target`` is the speed-up the issue asks for (None: no target). A
script that fails or times out gets a row saying so; a missing anchor time is shown as
"—". ``--from-json NAME=PATH`` builds the table from JSON files written earlier by the
scripts' ``--out``, without running anything. The full run takes about 2 hours on a
2-core CPU (most of it ``nuts.py``); ``--quick`` about 10-15 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DASH = "—"

Row = dict[str, Any]


def make_row(
    benchmark: str,
    case: str,
    ours_s: Optional[float],
    anchor: Optional[str],
    anchor_s: Optional[float],
    target: Optional[float] = None,
    note: Optional[str] = None,
) -> Row:
    """One comparison; ``ratio`` is ``anchor_s / ours_s`` when both are known."""
    row = dict(
        benchmark=benchmark,
        case=case,
        ours_s=ours_s,
        anchor=anchor,
        anchor_s=anchor_s,
        ratio=speedup(ours_s, anchor_s),
        target=target,
    )
    if note:
        row["note"] = note
    return row


def _number(x) -> Optional[float]:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def speedup(ours_s, anchor_s) -> Optional[float]:
    ours_s, anchor_s = _number(ours_s), _number(anchor_s)
    if ours_s is None or anchor_s is None or ours_s <= 0:
        return None
    return anchor_s / ours_s


def _fmt_s(x) -> str:
    x = _number(x)
    if x is None:
        return DASH
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _fmt_ratio(x) -> str:
    x = _number(x)
    return DASH if x is None else f"{x:.3g}×"


def build_table(rows: list[Row]) -> str:
    """The Markdown table of ``rows``: times in seconds, speed-up = anchor / ours.

    The ratio is recomputed from ``ours_s`` and ``anchor_s`` when both are present and
    taken from the row's ``ratio`` otherwise; anything unknown is shown as "—". ``met``
    says whether the speed-up reaches the row's ``target``.
    """
    lines = [
        "| benchmark | case | ours (s) | anchor | anchor (s) | speed-up (anchor / ours) "
        "| target | met |",
        "|---|---|---:|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ratio = speedup(r.get("ours_s"), r.get("anchor_s"))
        if ratio is None:
            ratio = _number(r.get("ratio"))
        target = _number(r.get("target"))
        if target is None:
            target_txt, met = DASH, DASH
        else:
            target_txt = f"≥ {target:.3g}×"
            met = DASH if ratio is None else ("yes" if ratio >= target else "no")
        case = str(r.get("case", ""))
        if r.get("note"):
            case += f" ({r['note']})"
        cells = [
            str(r.get("benchmark", "")),
            case,
            _fmt_s(r.get("ours_s")),
            r.get("anchor") or DASH,
            _fmt_s(r.get("anchor_s")),
            _fmt_ratio(ratio),
            target_txt,
            met,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# converters: each script's --out JSON -> rows
# ---------------------------------------------------------------------------------------


def rows_lds_em(data: dict) -> list[Row]:
    """``lds_em.py --out``: per-iteration and whole-fit times vs dynamax and pykalman."""
    bench = "EM, LDS"
    fit_iters = data.get("settings", {}).get("fit_iters", 100)
    rows = []
    for r in data.get("results", []):
        name = r.get("name", "?")
        if r.get("hung"):
            rows.append(make_row(bench, name, None, "dynamax", None, note="no result: hung"))
            continue
        o, d, p = r.get("ours", {}), r.get("dynamax", {}), r.get("pykalman")
        dyn = f"dynamax {d.get('model', '')}".strip()
        rows.append(
            make_row(
                bench,
                f"{name}: one EM iteration",
                o.get("per_iter_s"),
                dyn,
                d.get("per_iter_s"),
                target=1.0,
            )
        )
        if p is None:
            rows.append(
                make_row(
                    bench,
                    f"{name}: one EM iteration",
                    o.get("per_iter_s"),
                    "pykalman",
                    None,
                    note="pykalman has no batch EM",
                )
            )
        else:
            rows.append(
                make_row(
                    bench,
                    f"{name}: one EM iteration",
                    o.get("per_iter_s"),
                    "pykalman",
                    p.get("per_iter_s"),
                    target=50.0,
                )
            )
        rows.append(
            make_row(
                bench,
                f"{name}: whole fit, {fit_iters} iterations, fresh process",
                o.get("fit_s"),
                dyn,
                d.get("fit_s"),
                target=2.0,
            )
        )
        if "second_fit_s" in o:
            rows.append(
                make_row(
                    bench,
                    f"{name}: whole fit, second fit in the same process (new data)",
                    o.get("second_fit_s"),
                    dyn,
                    d.get("second_fit_s"),
                    target=2.0,
                )
            )
        if "fit_warm_cache_s" in o:
            rows.append(
                make_row(
                    bench,
                    f"{name}: whole fit, fresh process, warm JAX compilation cache (both)",
                    o.get("fit_warm_cache_s"),
                    dyn,
                    d.get("fit_warm_cache_s"),
                    target=2.0,
                )
            )
    return rows


def rows_particle_smoother(data: dict) -> list[Row]:
    """``particle_smoother.py --out``: one E-step vs ``particles`` and vs the bound."""
    bench = "particle E-step"
    cfg = data.get("config", {})
    T = cfg.get("T", "?")
    compare_n = cfg.get("compare_n")
    rows = []
    for p in data.get("particles", []):
        dx, N = p.get("dx"), p.get("N")
        ours = next(
            (
                o
                for o in data.get("ours", [])
                if o.get("dtype") == "float64" and o.get("dx") == dx and o.get("N") == N
            ),
            {},
        )
        rows.append(
            make_row(
                bench,
                f"tanh-RNN, T={T}, dx={dx}, N={N}, float64: filter + FFBSm + statistics",
                ours.get("median_s"),
                "particles (SMC + O(N²) backward sampling)",
                p.get("total_s"),
                target=100.0 if N == compare_n else None,
                note="failed" if p.get("failed") or ours.get("failed") else None,
            )
        )
    for b in data.get("bound", []):
        rows.append(
            make_row(
                bench,
                f"tanh-RNN, T={b.get('T', T)}, dx={b.get('dx')}, N={b.get('N')}, "
                f"{b.get('dtype')}: FFBSm vs an arithmetic lower bound",
                b.get("ours_s"),
                "lower bound (measured exp/s and flop/s)",
                b.get("sum_s"),
                target=1 / 3,
            )
        )
    return rows


def rows_eks_rbf(data: dict) -> list[Row]:
    """``eks_rbf.py --out``: one RBF EM iteration, EKS vs the particle E-step."""
    n = data.get("meta", {}).get("num_particles", "?")
    return [
        make_row(
            "EM, RBF model",
            f"T={r.get('T')}, I={r.get('I')}, dx={r.get('dx')}: one EM iteration with the EKS",
            r.get("eks_s"),
            f"ppl_dyn particle E-step (FFBSm, N={n})",
            r.get("particle_s"),
        )
        for r in data.get("rows", [])
    ]


def _t_of(name: str) -> Optional[int]:
    try:
        return int(name.split("T=")[1].split("/")[0])
    except (IndexError, ValueError):
        return None


def _per_ess(r: dict, key: str = "ess_per_s_params") -> Optional[float]:
    rate = _number(r.get(key))
    return None if rate is None or rate <= 0 else 1.0 / rate


def rows_nuts(data: dict) -> list[Row]:
    """``nuts.py --out``: seconds per effective draw (1 / min bulk ESS per second over the
    parameters) for the marginal vs latent forms and vs dynamax's filter; wall time for
    BlackJAX vs NumPyro. The targets apply at T >= 1000 (the issue's)."""
    bench = "NUTS, LDS"
    res = data.get("results", {})
    rows = []

    def get(name):
        r = res.get(name)
        return r if isinstance(r, dict) else None

    def note(*rs):
        return "no result" if any(r is not None and "error" in r for r in rs) else None

    Ts = sorted({t for n in res if "/init=" not in n and (t := _t_of(n)) is not None})
    for T in Ts:
        big = T >= 1000
        for backend in ("numpyro", "blackjax"):
            m, lat = get(f"marginal/{backend}/T={T}"), get(f"latent/{backend}/T={T}")
            if m is None and lat is None:
                continue
            rows.append(
                make_row(
                    bench,
                    f"T={T}, {backend}: s per effective draw, states integrated out "
                    "(Kalman) vs sampled",
                    _per_ess(m or {}),
                    "latent states, non-centred",
                    _per_ess(lat or {}),
                    target=5.0 if big else None,
                    note=note(m, lat),
                )
            )
        m, dyn = get(f"marginal/blackjax/T={T}"), get(f"dynamax/blackjax/T={T}")
        if m is not None or dyn is not None:
            rows.append(
                make_row(
                    bench,
                    f"T={T}, blackjax: s per effective draw, our Kalman marginal",
                    _per_ess(m or {}),
                    "dynamax lgssm_filter marginal",
                    _per_ess(dyn or {}),
                    target=3.0 if big else None,
                    note=note(m, dyn),
                )
            )
        for form in ("marginal", "latent"):
            bj, npy = get(f"{form}/blackjax/T={T}"), get(f"{form}/numpyro/T={T}")
            if bj is None and npy is None:
                continue
            rows.append(
                make_row(
                    bench,
                    f"T={T}, {form}: wall time, ppl_dyn.mcmc.run_blackjax",
                    (bj or {}).get("wall_s"),
                    "NumPyro MCMC(NUTS)",
                    (npy or {}).get("wall_s"),
                    target=1.0,
                    note=note(bj, npy),
                )
            )
    return rows


def rows_smoothers(data: dict) -> list[Row]:
    """``smoothers.py --out``: at N = 1e4, each linear-cost smoother against FFBSm at the
    Monte Carlo error of the EM statistics that FFBSm has there."""
    bench = "particle smoothers"
    T, dx = data.get("T", "?"), data.get("dx", "?")
    device = str(data.get("device", ""))
    where = "GPU" if "cuda" in device.lower() or "gpu" in device.lower() else "CPU"
    tgt = data.get("target", {})
    ref = tgt.get("ffbsm")
    rows = []
    if not ref:
        return rows
    note = "FFBSm time extrapolated O(N²)" if ref.get("extrapolated") else None
    for name, t in tgt.items():
        if name == "ffbsm":
            continue
        case = (
            f"LDS, T={T}, dx={dx}, {where}: {name} at the EM-statistics error of FFBSm "
            f"with N=1e4 (N* = {t.get('N_star', 0):.0f})"
        )
        rows.append(
            make_row(
                bench,
                case,
                t.get("seconds"),
                "FFBSm (O(N²)), N=1e4",
                ref.get("seconds"),
                target=20.0,
                note=note,
            )
        )
    return rows


def rows_many_sequences(data: dict) -> list[Row]:
    """``many_sequences.py --out``: one EM iteration over S sequences (no anchor)."""
    bench = "EM, many sequences"
    rows = []
    for r in data.get("rows", []):
        case = f"LDS, S={r.get('S')}, T<={r.get('T')}, {r.get('layout')} lengths: one EM iteration"
        rows.append(make_row(bench, case, r.get("per_iter_s"), None, None))
    return rows


BENCHMARKS: dict[str, tuple[str, Callable[[dict], list[Row]]]] = {
    "lds_em": ("lds_em.py", rows_lds_em),
    "particle_smoother": ("particle_smoother.py", rows_particle_smoother),
    "eks_rbf": ("eks_rbf.py", rows_eks_rbf),
    "nuts": ("nuts.py", rows_nuts),
    "smoothers": ("smoothers.py", rows_smoothers),
    "many_sequences": ("many_sequences.py", rows_many_sequences),
}


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------


def run_script(script: str, json_path: str, quick: bool, timeout_s: float) -> str:
    """Run one benchmark script; returns "ok", "timed out after ..." or "failed (...)"."""
    cmd = [sys.executable, os.path.join(HERE, script), "--out", json_path]
    if quick:
        cmd.append("--quick")
    # its own session, so that a timeout ends the script's child processes too
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {timeout_s:.0f} s"
    if code != 0:
        return f"failed (exit code {code})"
    if not os.path.exists(json_path):
        return "failed (wrote no JSON)"
    return "ok"


def rows_from_file(name: str, path: str) -> list[Row]:
    with open(path) as f:
        data = json.load(f)
    return BENCHMARKS[name][1](data)


def describe_file(path: str) -> str:
    """Where a table's rows came from: file name, modification time, quick or full."""
    with open(path) as f:
        data = json.load(f)
    quick = any(
        isinstance(data.get(k), dict) and data[k].get("quick")
        for k in ("environment", "meta", "config")
    )
    when = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return (
        f"from {os.path.basename(path)} ({'quick' if quick else 'full'} run, "
        f"{when:%Y-%m-%d %H:%M} UTC)"
    )


def merge_kept(table: str, old_text: str) -> str:
    """``table`` (new rows) merged into the table of ``old_text`` (an earlier
    results.md): old rows of a benchmark that ``table`` has rows for are replaced, in
    place, by the new ones; rows of other benchmarks are kept verbatim; benchmarks new to
    the old table go at the end. For rebuilding the table when only some scripts ran."""

    def rows_of(text):
        return [
            ln
            for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith(("| benchmark |", "|---"))
        ]

    def label(line):
        return line.split("|")[1].strip()

    new_rows = rows_of(table)
    new_labels = list(dict.fromkeys(label(ln) for ln in new_rows))
    out, placed = [], set()
    for ln in rows_of(old_text):
        lab = label(ln)
        if lab not in new_labels:
            out.append(ln)
        elif lab not in placed:
            out += [r for r in new_rows if label(r) == lab]
            placed.add(lab)
    out += [r for r in new_rows if label(r) not in placed]
    header = table.splitlines()[:2]
    return "\n".join(header + out)


def kept_status(old_text: str) -> dict[str, str]:
    """Each script's status from the 'Scripts:' line of an earlier results.md."""
    line = next((ln for ln in old_text.splitlines() if ln.startswith("Scripts: ")), "")
    status = {}
    for part in line[len("Scripts: ") :].rstrip(".").split(", `"):
        name, _, state = part.lstrip("`").partition("` ")
        if name in BENCHMARKS and state and state != "not run":
            status[name] = state
    return status


def render(
    rows: list[Row],
    status: dict[str, str],
    quick: bool,
    from_json: bool = False,
    keep_text: Optional[str] = None,
) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = "--from-json ..." if from_json else ("--quick" if quick else "")
    lines = [
        "## Benchmark table",
        "",
        f"Written by `python benchmarks/run_all.py{' ' + how if how else ''}` on {when}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs"
        + (" (quick: smoke-sized cases, not comparable with full runs)." if quick else "."),
        "Times are seconds (wall clock; what each one covers is in the script's docstring).",
        "NUTS rows compare seconds per effective draw (1 / minimum bulk ESS per second).",
        "Speed-up = anchor time / our time: above 1, ppl_dyn is faster.",
        "",
        build_table(rows) if keep_text is None else merge_kept(build_table(rows), keep_text),
        "",
        "Scripts: " + ", ".join(f"`{n}` {status.get(n, 'not run')}" for n in BENCHMARKS) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument(
        "--out",
        default=os.path.join(HERE, "results.md"),
        help="Markdown file to write (default: benchmarks/results.md)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per script (default: 1200 with --quick, 5400 without)",
    )
    ap.add_argument(
        "--only", default=None, help="comma-separated subset of " + ", ".join(BENCHMARKS)
    )
    ap.add_argument("--json-dir", default=None, help="keep each script's JSON here")
    ap.add_argument(
        "--from-json",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="use a JSON file written earlier by a script's --out; no run",
    )
    ap.add_argument(
        "--keep-rows",
        default=None,
        metavar="FILE",
        help="an earlier results.md: keep its rows (and script status) for the "
        "benchmarks not run or given now",
    )
    args = ap.parse_args(argv)

    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    given = {}
    for item in args.from_json:
        name, _, path = item.partition("=")
        given[name] = path
    if given:
        names = [n for n in BENCHMARKS if n in given]
    unknown = [n for n in names + list(given) if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    timeout = args.timeout or (1200.0 if args.quick else 5400.0)

    rows: list[Row] = []
    status: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        json_dir = args.json_dir or tmp
        os.makedirs(json_dir, exist_ok=True)
        for name in names:
            script, convert = BENCHMARKS[name]
            if name in given:
                path = given[name]
                state = describe_file(path)
            else:
                path = os.path.join(json_dir, f"{name}.json")
                print(f"=== {script}{' --quick' if args.quick else ''} ===", flush=True)
                t0 = time.perf_counter()
                state = run_script(script, path, args.quick, timeout)
                state += f" ({time.perf_counter() - t0:.0f} s)"
            status[name] = state
            if state.startswith(("ok", "from")):
                rows += rows_from_file(name, path)
            else:
                rows.append(make_row(name, "all cases", None, None, None, note=state))
    keep_text = None
    if args.keep_rows:
        with open(args.keep_rows) as f:
            keep_text = f.read()
        status = {**{k: v for k, v in kept_status(keep_text).items() if k not in status}, **status}
    text = render(rows, status, args.quick, from_json=bool(given), keep_text=keep_text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
