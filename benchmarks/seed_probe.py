"""Does a bench result hold at another rate? Retrain one (task, method) of a finished bench
folder at a rate of your choice, for the given seeds, and print each seed's runs side by side:
the grid's (at the rate seed 0 chose on validation) and the probe's.

    python benchmarks/seed_probe.py --bench results/text-here --preset text-here \
        --task rotten-tomatoes --method unipelt-prompt --lr 1e-3 --seeds 0 1 2 \
        --output results/checks/text-here-unipelt-prompt-1e-3

The runs are the grid's own cells (same backbone, schedule, batch, validation cadence, val/test
subsets) at another rate; `--output` gets their results.jsonl and report.md and resumes where it
stopped. The table gives each run's best validation score and its step, its last validation
score (a run that collapsed to one class ends there) and its test score. The grid's choice is
not revisited: a probe asks whether a seed's failure belongs to the rate or to the method, after
the fact, and its test scores choose nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from petlkit.bench.grid import SELECTION, Cell, GridRunner, Unit, append_record, read_records
from petlkit.bench.presets import get_presets, narrowed
from petlkit.bench.report import best_point, write_report
from petlkit.bench.revision import commit
from petlkit.bench.selection import Choice


def main_cells(records: list[dict], task: str, method: str) -> dict[int, dict]:
    """The full-data cells of (task, method) in a bench folder's records, by seed."""
    return {r["seed"]: r for r in records if r["cell"] == Cell(task, method, r["seed"]).key}


def trial_val(trials: list[dict], task: str, method: str, lr: float) -> float | None:
    """The validation score the grid's rate selection saw at `lr`, if it tried that rate."""
    unit = Unit(task, method).key
    seen = [t["val"] for t in trials if t["unit"] == unit and t["lr"] == lr]
    return seen[0] if seen else None


def describe(record: dict | None) -> str:
    """Best validation score @ its step, last validation score, test score (in points)."""
    if record is None:
        return "– | – | –"
    curve = record.get("curve") or [[record["best_step"], record["val"]]]
    best_step, best = best_point(curve)
    return (f"{100 * best:.1f} @ {best_step} | {100 * curve[-1][1]:.1f} | "
            f"{100 * record['score']:.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--bench", required=True, type=Path, help="a finished bench folder")
    parser.add_argument("--preset", required=True, help="the preset that folder ran")
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--lr", required=True, type=float, help="the rate to probe")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    commit()  # the records name the code as it is at the start (petlkit.bench.revision)
    grid = main_cells(read_records(args.bench), args.task, args.method)
    if not grid:
        print(f"{args.bench} has no full-data cell of {args.method!r} on {args.task!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    (preset,) = get_presets(args.preset)
    steps = next(iter(grid.values()))["steps"]
    preset = narrowed(preset, tasks=[args.task], methods=[args.method], seeds=args.seeds,
                      steps=steps)  # fmt: skip
    runner = GridRunner(preset, args.output, None, print)
    args.output.mkdir(parents=True, exist_ok=True)
    done = {r["seed"]: r for r in read_records(args.output)}
    seen = trial_val(read_records(args.bench, SELECTION), args.task, args.method, args.lr)
    choice = Choice(args.lr, seen, (args.lr,), None)
    for seed in args.seeds:
        if seed not in done:
            done[seed] = runner.run_cell(Cell(args.task, args.method, seed), choice)
            append_record(args.output, done[seed])
    write_report(list(done.values()), args.output, f"{preset.name}, lr {args.lr:g} (probe)")
    chosen = next(iter(grid.values()))["lr"]
    rates = f"({chosen:g}, chosen at seed 0 on validation) and at the probe's ({args.lr:g})"
    print(f"\n{args.task}, {args.method}, {steps} steps: each seed at the grid's rate {rates}")
    print("| seed | grid: best val @ step | last val | test | probe: best val @ step | "
          "last val | test |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        print(f"| {seed} | {describe(grid.get(seed))} | {describe(done[seed])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
