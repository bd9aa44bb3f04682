"""The run folder's metrics log (`metrics.jsonl`): one JSON line per logged step, appended as
training goes; a resumed run first drops the lines of the steps it is about to repeat."""

from __future__ import annotations

import json
from pathlib import Path

from petlkit.errors import CheckpointError
from petlkit.io import atomic_write

METRICS_LOG = "metrics.jsonl"


def forget_after(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (and any line a kill cut short), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the kill
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


def append(path: Path, record: dict) -> None:
    """Append one record; a failed write says the last checkpoint is kept and how to go on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise CheckpointError(
            f"could not write {path}: {err.strerror or err}; the last checkpoint is kept: make "
            "the folder writable and rerun with --resume"
        ) from err
