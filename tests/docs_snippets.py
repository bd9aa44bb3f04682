"""The fenced Python blocks of a documentation page, to run as a test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def python_blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_page(page: str) -> dict:
    """Execute every Python block of `page` in one namespace (as a reader would, in order)."""
    namespace: dict = {"__name__": "docs_snippet"}
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), namespace)  # noqa: S102
    return namespace
