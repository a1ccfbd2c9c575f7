"""``python -m ppl_dyn.launch --num-processes N script.py [args]``: run ``N`` copies of
a script on this machine, joined in ``jax.distributed`` (see :mod:`ppl_dyn.distributed`;
the script joins when it imports ``ppl_dyn``, before anything else starts JAX). Each
process's output is printed with its number; the exit status is the first non-zero one.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ppl_dyn.distributed import launch_local


def main(args: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ppl_dyn.launch",
        description="Run N copies of a Python script on this machine, joined in "
        "jax.distributed (the script calls ppl_dyn.distributed.initialize()).",
    )
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("script")
    ap.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(args)
    results = launch_local([sys.executable, ns.script, *ns.script_args], ns.num_processes)
    status = 0
    for pid, r in enumerate(results):
        for line in r.stdout.splitlines():
            print(f"[{pid}] {line}")
        if r.returncode != 0:
            print(f"[{pid}] exited with status {r.returncode}:\n{r.stderr[-4000:]}",
                  file=sys.stderr)  # fmt: skip
            status = r.returncode
    if len(results) < ns.num_processes:
        status = status or 1
    return status


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    raise SystemExit(main(sys.argv[1:]))
