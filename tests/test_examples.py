"""Every example script runs at tiny size (`--small`)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
# examples that take half a minute even at tiny size (NUTS compiles per call): slow tier,
# to keep the default suite within its budget (~15 min on 2 cores)
SLOW = {"nuts_lds.py"}


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=(pytest.mark.slow,) * (p.name in SLOW)) for p in EXAMPLES],
    ids=lambda p: p.name,
)
def test_example_runs_small(script, tmp_path):
    # run from an empty directory: an example that writes figures by default writes there
    proc = subprocess.run(
        [sys.executable, str(script), "--small"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example should print what it found"
