"""How many CPU hours does a bench grid take? Read finished bench folders and print, per method,
its rate trials and cells, the seconds they recorded, and what a fresh run of the same grid would
take on an idle machine.

    python benchmarks/grid_hours.py results/lm-here/lm-here-sentiment \
        results/lm-here/lm-here-products

A trial trains and validates; a cell also scores the test set. The seed-0 cell reuses the chosen
trial's weights and records the trial's seconds (its test scoring goes unrecorded), so a fresh
run of a method costs (trials − 1) × a trial + seeds × a cell. Recorded seconds include runs
slowed by other jobs sharing the two cores (the test suite beside a grid ran three times
slower), so each kind of run is taken at its typical uncontended time: the median of its runs
that took at most 1.5× their lower quartile. A method's runs of a kind do the same work (same
steps, batch and subsets; only the length of generated answers varies), so their times differ
mostly by the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from petlkit.bench.grid import RESULTS, SELECTION, SELECTION_SEED, read_records

CONTENDED = 1.5  # a run this much slower than the method's usual runs shared the cores


def runs(folder: Path) -> dict[str, tuple[list[float], list[float], int]]:
    """Per method: its trials' seconds, the seconds of its cells that trained anew (not a
    seed-0 cell reusing a trial), and its number of cells."""
    trials, cells, count = defaultdict(list), defaultdict(list), defaultdict(int)
    for record in read_records(folder, SELECTION):
        trials[record["method"]].append(record["seconds"])
    for record in read_records(folder, RESULTS):
        method = record["method"]
        count[method] += 1
        if record["seed"] != SELECTION_SEED or method not in trials:
            cells[method].append(record["seconds"])
    return {m: (trials[m], cells[m], count[m]) for m in count}


def typical(seconds: list[float]) -> float:
    """The median of the runs within CONTENDED × the lower quartile (a run can be faster than
    the rest: a collapsed model generates short answers when scored)."""
    quartile = sorted(seconds)[len(seconds) // 4]
    return statistics.median(s for s in seconds if s <= CONTENDED * quartile)


def idle_seconds(trials: list[float], cells: list[float], count: int) -> float:
    """A fresh run's seconds: every trial but the chosen one's reuse, and every cell's test."""
    cell = typical(cells or trials)
    return (len(trials) - 1) * typical(trials) + count * cell if trials else count * cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished bench folders")
    folders = parser.parse_args(argv).folders
    print("| grid | method | trials | cells | recorded h | trial, s | cell, s | idle estimate h |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    recorded = idle = 0.0
    for folder in folders:
        for method, (trials, cells, count) in runs(folder).items():
            spent, estimate = sum(trials) + sum(cells), idle_seconds(trials, cells, count)
            recorded, idle = recorded + spent, idle + estimate
            trial = f"{typical(trials):.0f}" if trials else "–"
            cell = f"{typical(cells):.0f}" if cells else "–"
            print(f"| {folder.name} | {method} | {len(trials)} | {count} | {spent / 3600:.2f} | "
                  f"{trial} | {cell} | {estimate / 3600:.2f} |")  # fmt: skip
    print(f"\ntotal: {recorded / 3600:.1f} h recorded, {idle / 3600:.1f} h on an idle machine")


if __name__ == "__main__":
    main()
