"""Griffe extension for the docs build: render the Sphinx markup in ppl_dyn's docstrings.

The docstrings are Google style (Args/Returns/Example sections) but write maths and
cross-references the Sphinx way. Before mkdocstrings converts a docstring to Markdown,
this extension rewrites

* ``.. math::`` followed by an indented block into a ``$$ ... $$`` display block,
* ``:math:`x_t``` into ``$x_t$`` (both rendered by pymdownx.arithmatex and MathJax),
* ``:class:`~ppl_dyn.infer.EM``` (and ``:func:``, ``:meth:``, ...) into ```EM```.

Only the rendered documentation changes; the source docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_XREF = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc|py:\w+):`(~?)([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _xref(match: re.Match) -> str:
    short, target = match.group(1), match.group(2).strip()
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _display_math(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        body = [m.group(2)] if m.group(2) else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        trailing_blank = i < len(lines)
        out += [indent + "$$"] + [indent + b for b in body if b] + [indent + "$$"]
        if trailing_blank:
            out.append("")
    return "\n".join(out)


def sphinx_to_markdown(text: str) -> str:
    """Rewrite the Sphinx maths and cross-reference roles of a docstring as Markdown."""
    text = _display_math(text)
    text = _INLINE_MATH.sub(lambda m: "$" + m.group(1).strip() + "$", text)
    return _XREF.sub(_xref, text)


class SphinxMarkup(griffe.Extension):
    """Apply :func:`sphinx_to_markdown` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = sphinx_to_markdown(obj.docstring.value)
