"""Seed statistics of a grid's records: per method and task, the scores of every seed, their
means and spreads; the tables (report.py) and plots (plots.py) read them from here.

Scores are in points (0–100): accuracy, MCC and correlations × 100; SQuAD EM/F1 as they are;
perplexity as it is, where lower is better (`Summary.sign` is then −1, and every "best", "ahead"
and ranking reads it).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from petlkit.errors import PetlError
from petlkit.tasks.metrics import LOWER_IS_BETTER

AS_THEY_ARE = ("exact_match", "f1", *LOWER_IS_BETTER)  # not fractions: no × 100


def points(record: dict) -> float:
    return record["score"] if record["metric"] in AS_THEY_ARE else 100.0 * record["score"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(diff: float, std_a: float, std_b: float) -> str:
    """The one tie rule of every table and claim: "tie" when two means differ by no more than
    the larger of their stds over seeds, else "ahead" or "behind" (the sign of `diff`)."""
    if abs(diff) <= max(std_a, std_b):
        return "tie"
    return "ahead" if diff > 0 else "behind"


class Summary:
    """Seed means of the main cells: scores[method][task] = [points per seed]."""

    def __init__(self, records: list[dict], order: list[str] | None = None) -> None:
        main = [r for r in records if r.get("shots") is None]
        self.tasks = list(dict.fromkeys(r["task"] for r in main))
        found = list(dict.fromkeys(r["method"] for r in main))
        rank = {m: i for i, m in enumerate(order or found)}  # the preset's order, if given
        self.methods = sorted(found, key=lambda m: rank.get(m, len(rank)))
        self.groups = {r["task"]: r["group"] for r in main}
        lower = {r["metric"] in LOWER_IS_BETTER for r in main}
        if len(lower) > 1:
            raise PetlError("one table cannot mix scores where lower is better (perplexity) with "
                            "scores where higher is; report those tasks apart")  # fmt: skip
        self.sign = -1 if lower == {True} else 1  # the direction of "better"
        self.scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.params: dict[str, tuple[int, float]] = {}
        self.by_seed: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
        for r in main:
            self.scores[r["method"]][r["task"]].append(points(r))
            self.by_seed[r["method"]].setdefault(r["task"], {})[r["seed"]] = points(r)
            self.params[r["method"]] = (r["trainable"], r["percent"])
        trained = {r["method"] for r in main if r.get("steps", 1) > 0}
        self.untrained = [m for m in self.methods if m not in trained]  # zero-shot: scored once
        self.fewshot = [r for r in records if r.get("shots") is not None]
        self.dg = [r for r in main if "dg" in r]

    def better(self, diff: float) -> float:
        """A difference of means turned so that positive means better."""
        return self.sign * diff

    def task_mean(self, method: str, task: str) -> float | None:
        values = self.scores[method].get(task)
        return statistics.fmean(values) if values else None

    def mean(self, method: str, tasks: list[str] | None = None) -> float | None:
        """The mean over tasks of the seed means (None if a task is missing)."""
        values = [self.task_mean(method, t) for t in (tasks or self.tasks)]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def seeds(self, method: str, task: str | None = None) -> set[int]:
        """The seeds a method has run: on `task`, or on any task."""
        tasks = self.by_seed[method]
        if task:
            return set(tasks.get(task, {}))
        return {seed for by_seed in tasks.values() for seed in by_seed}

    def overall(self, method: str) -> tuple[float, float]:
        """Mean over tasks, ± the std over seeds of the per-seed means over tasks."""
        seeds: dict[int, list[float]] = defaultdict(list)
        for task in self.tasks:
            for seed, value in self.by_seed[method].get(task, {}).items():
                seeds[seed].append(value)
        whole = [statistics.fmean(v) for v in seeds.values() if len(v) == len(self.tasks)]
        mean = self.mean(method)
        std = statistics.stdev(whole) if len(whole) > 1 else 0.0
        return (mean if mean is not None else float("nan")), std

    def group_tasks(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for task in self.tasks:
            out[self.groups[task]].append(task)
        return dict(out)
