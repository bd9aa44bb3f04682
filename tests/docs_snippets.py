"""The fenced Python blocks of a documentation page, to run as a test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((ROOT / page).read_text())


def documented_pages() -> list[str]:
    """The README and every documentation page that holds a Python block."""
    docs = sorted((ROOT / "docs").rglob("*.md"))
    pages = ["README.md", *(str(p.relative_to(ROOT)) for p in docs)]
    return [page for page in pages if python_blocks(page)]


def run_page(page: str) -> dict:
    """Execute every Python block of `page` in one namespace (as a reader would, in order)."""
    namespace: dict = {"__name__": "docs_snippet"}
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), namespace)  # noqa: S102
    return namespace
