"""The git commit of the running petlkit, stamped on benchmark records and reports."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=folder,
                              timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None


def describe(folder: Path) -> str:
    """The short commit hash of the checkout holding `folder`, with "+changes" when files under
    `folder` differ from that commit or are not in it (the code that ran is then not the commit
    alone; ignored files such as caches do not count), or "unknown" outside git."""
    head = _git(folder, "rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    changed = _git(folder, "status", "--porcelain", "--", ".")
    dirty = changed is not None and bool(changed.stdout.strip())
    return head.stdout.strip() + ("+changes" if dirty else "")


@functools.cache
def commit() -> str:
    """`describe` of the petlkit package, read once per process, first when a grid starts: the
    code that runs is the code loaded then, whatever is edited while it runs."""
    return describe(Path(__file__).parents[1])
