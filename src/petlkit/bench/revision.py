"""The git commit of the running petlkit, stamped on benchmark records and reports."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """The short commit hash of the checkout petlkit runs from ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"
