"""Is a bench schedule long enough? Retrain each seed-0 cell of a finished bench folder at the
rate it chose, for a longer schedule, and print how far the longer run moves its test score.

    python benchmarks/schedule_probe.py --bench results/vision-dg-600steps --preset vision-dg \
        --task mnist-5k --steps 1200 --output results/checks/vision-1200steps

`--fewshot` probes the task's few-shot cells (every K) instead of its full-data cells; `--size K`
its low-resource cells at K training examples (`text-lowres`):

    python benchmarks/schedule_probe.py --bench results/text-lowres --preset text-lowres \
        --task sentiment-movies-binary --size 1000 --steps 600 \
        --output results/checks/lowres-movies-K1000-600steps

The runs are the grid's own cells (same backbone, method arguments, batch, validation cadence,
val/test subsets, the same K examples drawn), only longer; `--output` gets their results.jsonl,
report.md and convergence.png, and resumes where it stopped. The table gives each run's best
validation score at both lengths (what a schedule may be chosen on: test data never is), its
test score at both, and the spread of the folder's seeds at the shorter one. The rate is the one
the shorter schedule chose: a probe of the schedule, not a fair comparison of methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from petlkit.bench.grid import Cell, GridRunner, append_record, read_records
from petlkit.bench.presets import get_presets, narrowed
from petlkit.bench.report import write_report
from petlkit.bench.revision import commit
from petlkit.bench.selection import Choice
from petlkit.bench.summary import mean_std, points
from petlkit.tasks.metrics import LOWER_IS_BETTER


def seed0_cells(records: list[dict], task: str, fewshot: bool = False,
                size: int | None = None) -> list[dict]:  # fmt: skip
    """The seed-0 cells of `task` among a bench folder's records: its full-data cells, its
    few-shot cells, or its low-resource cells at `size` training examples."""
    return [r for r in records
            if r["task"] == task and r["seed"] == 0 and (r.get("shots") is not None) == fewshot
            and r.get("size") == size]  # fmt: skip


def seed_spread(records: list[dict], cell: dict) -> str:
    """The std over seeds of the records like `cell`, in the report's units (points, or
    perplexity as it is), or "–" for one seed."""
    same = ("task", "method", "shots", "size")
    scores = [points(r) for r in records if all(r.get(k) == cell.get(k) for k in same)]
    return f"{mean_std(scores)[1]:.1f}" if len(scores) > 1 else "–"


def best_val(record: dict) -> str:
    """The best validation score of a run: points, or for a perplexity task the lowest
    validation loss in nats (validation scores are then the negated loss)."""
    if not record.get("curve"):
        return "–"
    best = max(v for _, v in record["curve"])
    return f"{-best:.3f}" if record["metric"] in LOWER_IS_BETTER else f"{100 * best:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--bench", required=True, type=Path, help="a finished bench folder")
    parser.add_argument("--preset", required=True, help="the preset that folder ran")
    parser.add_argument("--task", required=True)
    parser.add_argument("--steps", required=True, type=int, help="the longer schedule")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", help="a subset of the folder's methods")
    parser.add_argument("--fewshot", action="store_true", help="probe the few-shot cells")
    parser.add_argument("--size", type=int, help="probe the low-resource cells at this K")
    args = parser.parse_args(argv)
    commit()  # the records name the code as it is at the start (petlkit.bench.revision)
    bench_records = read_records(args.bench)
    shorter = [r for r in seed0_cells(bench_records, args.task, args.fewshot, args.size)
               if not args.methods or r["method"] in args.methods]  # fmt: skip
    if not shorter:
        kind = ("few-shot" if args.fewshot else "full-data" if args.size is None
                else f"K = {args.size}")  # fmt: skip
        print(f"{args.bench} has no seed-0 {kind} cell of {args.task!r}", file=sys.stderr)
        return 2
    (preset,) = get_presets(args.preset)
    preset = narrowed(preset, tasks=[args.task], seeds=[0], steps=args.steps,
                      methods=[r["method"] for r in shorter],
                      sizes=None if args.size is None else [args.size])  # fmt: skip
    runner = GridRunner(preset, args.output, None, print)
    args.output.mkdir(parents=True, exist_ok=True)
    done = {r["cell"]: r for r in read_records(args.output)}
    rows = []
    for before in shorter:
        cell = Cell(args.task, before["method"], 0, before.get("shots"), args.size)
        if cell.key not in done:
            choice = Choice(before["lr"], before["val_at_choice"], tuple(before["grid"]),
                            before["edge"])  # fmt: skip
            done[cell.key] = runner.run_cell(cell, choice)
            append_record(args.output, done[cell.key])
        after = done[cell.key]
        gain = points(after) - points(before)  # perplexity: negative is better
        k_cell = f" | {before['shots']}" if args.fewshot else ""
        spread = seed_spread(bench_records, before)
        rows.append(f"| {before['method']}{k_cell} | {before['lr']:g} | {best_val(before)} → "
                    f"{best_val(after)} | {points(before):.1f} | "
                    f"{points(after):.1f} | {gain:+.1f} | {spread} | "
                    f"{before['best_step']} → {after['best_step']} |")  # fmt: skip
    write_report(list(done.values()), args.output, f"{preset.name}, {args.steps} steps (probe)")
    ran = "/".join(str(n) for n in sorted({r["steps"] for r in shorter if r["steps"]}))
    at_k = "" if args.size is None else f", K = {args.size}"
    print(f"\n{args.task}{at_k}, seed 0, the rate chosen at {ran} steps: best validation score "
          f"and test {before['metric']} at {ran} and at {args.steps} steps; the seeds' std at "
          f"{ran}" + ("; validation as loss in nats" if before["metric"] in LOWER_IS_BETTER
                      else ""))  # fmt: skip
    k_head, k_rule = (" | K", "|---:") if args.fewshot else ("", "")
    print(f"| method{k_head} | lr | best val (shorter → longer) | test, shorter | test, longer | "
          "change | seeds' std | best step (shorter → longer) |")  # fmt: skip
    print(f"|---{k_rule}|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
