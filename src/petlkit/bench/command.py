"""`petlkit bench` and `petlkit demo`: run presets, then print and write their reports."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

from petlkit.bench.grid import read_records, run_grid
from petlkit.bench.presets import get_presets, narrowed
from petlkit.bench.report import variance_note, write_report
from petlkit.bench.revision import commit


def run_bench(
    name: str,
    output: str | Path,
    *,
    data_dir: str | None = None,
    report_only: bool = False,
    brief: bool = False,
    shard: tuple[int, int] = (0, 1),
    **narrow,
) -> str:
    """Run the preset (each part of a composite one in `<output>/<part>`); return the reports.
    `shard=(i, n)`: this process runs the i-th of n shares of the grid (n processes at once)."""
    output = Path(output)
    parts = get_presets(name)
    texts, everything = [], []
    start = time.perf_counter()
    for preset in parts:
        order = list(preset.methods)  # the whole preset's: a folder holds other runs' methods too
        described = preset.train.get("steps")  # the schedule the preset's description names
        preset = narrowed(preset, **narrow)
        folder = output / preset.name if len(parts) > 1 else output
        if report_only:
            records = read_records(folder)
        else:
            records = run_grid(preset, folder, data_dir, shard=shard)
        if not records:
            texts.append(f"# {preset.name}\n\nno results in {folder} yet\n")
            continue
        runs = sorted({r["commit"] for r in records if "commit" in r})
        made = f"cells run by petlkit {', '.join(runs)}; " if runs else ""
        title = (f"{preset.name}: {preset.description}; seeds {list(preset.seeds)} ({made}"
                 f"report by petlkit {commit()}, {date.today().isoformat()})")  # fmt: skip
        title += _given_schedule(described, preset.train.get("steps"))
        title += _other_schedule(records, preset.train.get("steps"))
        texts.append(write_report(records, folder, title, order, brief=brief))
        everything += records
    if brief and everything:
        texts.append(variance_note(everything))
    if not report_only:
        texts.append(f"wall time: {time.perf_counter() - start:.0f} s; reports and plots in "
                      f"{output}")  # fmt: skip
    return "\n".join(texts)


def _given_schedule(described: int | None, steps: int | None) -> str:
    """A note for a preset run at another length than its description says (`--steps`)."""
    if steps is None or steps == described:
        return ""
    return f". Run at {steps} steps (--steps), not the {described} the description above names"


def _other_schedule(records: list[dict], steps: int | None) -> str:
    """A note for a report rebuilt from cells that ran another schedule than the preset's now."""
    trained = (r for r in records if r.get("shots") is None and r.get("steps"))  # zero-shot: 0
    ran = sorted({r["steps"] for r in trained})
    if steps is None or not ran or ran == [steps]:
        return ""
    return (f". Note: these cells ran {' and '.join(map(str, ran))} steps; the preset now trains "
            f"{steps}, so its description above is not theirs")  # fmt: skip
