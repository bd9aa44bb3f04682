"""MkDocs hook: TeX between `$$ ... $$` lines (display) and `$...$` (inline) becomes MathML when
the site is built, so equations render in any current browser with no script and no network.

Code (fenced blocks, indented blocks and `inline code`) is left as written.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from latex2mathml.converter import convert

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INDENTED = re.compile(r"(?:^\n)((?:^(?: {4}|\t).*\n?)+)", re.M)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_DISPLAY = re.compile(r"^\$\$[ \t]*\n(.+?)\n\$\$[ \t]*$", re.S | re.M)
_INLINE = re.compile(r"(?<![\\$\w])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])")


def _apart_from(code: re.Pattern, text: str, change: Callable[[str], str]) -> str:
    """`change` applied to the parts of `text` that `code` does not match."""
    out, last = [], 0
    for block in code.finditer(text):
        out += [change(text[last : block.start()]), block.group(0)]
        last = block.end()
    return "".join(out + [change(text[last:])])


def _inline_math(text: str) -> str:
    # in a span: a line that starts with <math> would otherwise be taken for a block of HTML
    return _INLINE.sub(lambda m: f'<span class="math">{convert(m.group(1))}</span>', text)


def _prose(text: str) -> str:
    text = _DISPLAY.sub(lambda m: "\n" + convert(m.group(1).strip(), display="block") + "\n", text)
    return _apart_from(_CODE_SPAN, text, _inline_math)


def render_math(markdown: str) -> str:
    """`markdown` with its TeX replaced by MathML; code blocks and spans untouched."""
    return _apart_from(_FENCE, markdown, lambda part: _apart_from(_INDENTED, part, _prose))


def on_page_markdown(markdown: str, **_) -> str:
    return render_math(markdown)
