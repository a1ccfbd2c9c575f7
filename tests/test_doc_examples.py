"""The Python examples of the pages listed here run as pasted.

Every fenced ``python`` block of a page is executed, in order, in one namespace per page
(later blocks may use what earlier ones defined). A block whose first line is
``# fragment`` is an excerpt, not a program, and is skipped.
"""

import pathlib
import re

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [
    "README.md",
    "docs/index.md",
    "docs/getting_started.md",
    "docs/models.md",
    "docs/choosing.md",
    "docs/mcmc.md",
    "docs/sgd.md",
    "docs/particle.md",
    "docs/eks.md",
    "docs/psaem.md",
    "docs/lstm.md",
    "docs/canonical.md",
    "docs/plugins.md",
    "docs/scale.md",
    "docs/forecasting.md",
]
# pages whose examples take minutes (NUTS and BlackJAX runs, compiled per call), or half
# a minute and more (particle EM, online EM, PSAEM/PGAS, sharding): slow tier, to keep the
# default suite within its budget (~15 min on 2 cores)
SLOW_PAGES = {"docs/mcmc.md", "docs/particle.md", "docs/psaem.md", "docs/scale.md"}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text()
    return [b for b in _BLOCK.findall(text) if not b.startswith("# fragment")]


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=(pytest.mark.slow,) * (p in SLOW_PAGES)) for p in PAGES]
)
def test_page_examples_run_as_pasted(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no runnable python block"
    namespace: dict = {"__name__": f"doc_{pathlib.Path(page).stem}"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{page} [python block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples


def test_every_page_with_python_examples_is_listed():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    with_python = {str(p.relative_to(ROOT)) for p in pages if _BLOCK.search(p.read_text())}
    assert with_python <= set(PAGES), f"add to PAGES: {sorted(with_python - set(PAGES))}"
