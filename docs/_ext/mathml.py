"""MkDocs hook: the pages' TeX turned into MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps each formula as
``<span class="arithmatex">\\(...\\)</span>`` or ``<div class="arithmatex">\\[...\\]</div>``;
this hook replaces the TeX inside by the MathML that ``latex2mathml`` writes. Browsers
render MathML natively, so the site shows its equations with no script and no network
(no MathJax from a CDN). A formula that cannot be converted is a build warning (an error
under ``mkdocs build --strict``) naming the page and the TeX.
"""

from __future__ import annotations

import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>",
    re.S,
)


def to_mathml(tex: str, display: str) -> str:
    """The MathML of one formula (``display`` is ``"inline"`` or ``"block"``)."""
    return convert(tex.strip(), display=display)


def on_page_content(content: str, page, **kwargs) -> str:
    def replace(m: re.Match) -> str:
        display = "block" if m["block"] is not None else "inline"
        tex = html.unescape(m["block"] if m["block"] is not None else m["inline"])
        try:
            math = to_mathml(tex, display)
        except Exception as err:  # noqa: BLE001 - any failure is reported with its formula
            log.warning(
                "%s: cannot convert the formula %r to MathML (%s)", page.file.src_uri, tex, err
            )
            return m[0]
        return f'<{m["tag"]} class="arithmatex">{math}</{m["tag"]}>'

    return _FORMULA.sub(replace, content)
