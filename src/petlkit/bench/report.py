"""Tables (Markdown + CSV), plots (PNG) and goal checks from a grid's `results.jsonl`.

Scores are shown in points (0–100): accuracy, MCC and correlations × 100; SQuAD EM/F1 as they are.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from petlkit.io import atomic_write

ALREADY_PERCENT = ("exact_match", "f1")
UNIPELT_SUBMODULES = ("lora", "adapter", "prefix", "prompt")


def points(record: dict) -> float:
    return record["score"] if record["metric"] in ALREADY_PERCENT else 100.0 * record["score"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Summary:
    """Seed means of the main cells: scores[method][task] = [points per seed]."""

    def __init__(self, records: list[dict], order: list[str] | None = None) -> None:
        main = [r for r in records if r.get("shots") is None]
        self.tasks = list(dict.fromkeys(r["task"] for r in main))
        found = list(dict.fromkeys(r["method"] for r in main))
        rank = {m: i for i, m in enumerate(order or found)}  # the preset's order, if given
        self.methods = sorted(found, key=lambda m: rank.get(m, len(rank)))
        self.groups = {r["task"]: r["group"] for r in main}
        self.scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.params: dict[str, tuple[int, float]] = {}
        for r in main:
            self.scores[r["method"]][r["task"]].append(points(r))
            self.params[r["method"]] = (r["trainable"], r["percent"])
        self.fewshot = [r for r in records if r.get("shots") is not None]
        self.dg = [r for r in main if "dg" in r]

    def task_mean(self, method: str, task: str) -> float | None:
        values = self.scores[method].get(task)
        return statistics.fmean(values) if values else None

    def mean(self, method: str, tasks: list[str] | None = None) -> float | None:
        """The mean over tasks of the seed means (None if a task is missing)."""
        values = [self.task_mean(method, t) for t in (tasks or self.tasks)]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def group_tasks(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for task in self.tasks:
            out[self.groups[task]].append(task)
        return dict(out)


def main_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    groups = summary.group_tasks()
    header = ["method", "trainable", "%", *summary.tasks]
    header += [f"{g} mean" for g in groups] if len(groups) > 1 else []
    header.append("mean")
    rows = []
    for method in summary.methods:
        trainable, percent = summary.params[method]
        row = [method, f"{trainable:,}", f"{percent:.3f}"]
        for task in summary.tasks:
            values = summary.scores[method].get(task)
            if values:
                mean, std = _mean_std(values)
                row.append(f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}")
            else:
                row.append("–")
        means = [summary.mean(method, ts) for ts in groups.values()] if len(groups) > 1 else []
        means.append(summary.mean(method))
        row += ["–" if m is None else f"{m:.1f}" for m in means]
        rows.append(row)
    return header, rows


def fewshot_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    shots = sorted({r["shots"] for r in summary.fewshot})
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in summary.fewshot:  # mean over few-shot tasks and seeds
        table[r["method"]][r["shots"]].append(points(r))
    header = ["method", *(f"{k}-shot" for k in shots)]
    rows = [[m, *(f"{statistics.fmean(table[m][k]):.1f}" if table[m][k] else "–" for k in shots)]
            for m in table]  # fmt: skip
    return header, rows


def dg_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Per method: each source's own test score, then the same weights on each target."""
    pairs = list(dict.fromkeys((r["task"], t) for r in summary.dg for t in r["dg"]))
    sources = list(dict.fromkeys(source for source, _ in pairs))
    header = ["method"]
    for source in sources:
        header += [f"{source} (source)"] + [f"{s} → {t}" for s, t in pairs if s == source]
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in summary.dg:
        scores[r["method"]][r["task"]].append(points(r))
        for target, value in r["dg"].items():
            scores[r["method"]][f"{r['task']} → {target}"].append(100 * value)
    rows = []
    for method, by_column in scores.items():
        row = [method]
        for column in header[1:]:
            values = by_column.get(column.removesuffix(" (source)"))
            row.append(f"{statistics.fmean(values):.1f}" if values else "–")
        rows.append(row)
    return header, rows


def goals(summary: Summary) -> list[str]:
    """The issue's goals, checked on these results (each line says met or missed, by how much)."""
    lines = []
    sas, lora = summary.mean("sas"), summary.mean("lora")
    if sas is not None and lora is not None:
        gap = sas - lora
        ratio = summary.params["sas"][0] / max(summary.params["lora"][0], 1)
        close, small = gap >= -0.5, ratio <= 0.2
        lines.append(f"SaS within 0.5 points of LoRA with ≤ 1/5 of its parameters: "
                     f"{'met' if close and small else 'missed'} (SaS − LoRA = {gap:+.2f} points: "
                     f"{'within' if close else 'outside'} 0.5; parameters {ratio:.3f} × LoRA's: "
                     f"{'within' if small else 'more than'} 1/5)")  # fmt: skip
    parts = [summary.mean(m) for m in ("sas-shared", "sas-specific")]
    if sas is not None and None not in parts:
        best = max(parts)
        lines.append(f"SaS shared+specific beats each alone: {'met' if sas > best else 'missed'} "
                     f"(both {sas:.2f}, shared only {parts[0]:.2f}, specific only "
                     f"{parts[1]:.2f})")  # fmt: skip
    uni = summary.mean("unipelt-prompt")
    singles = {m: summary.mean(m) for m in UNIPELT_SUBMODULES if summary.mean(m) is not None}
    if uni is not None and singles:
        name, best = max(singles.items(), key=lambda kv: kv[1])
        lines.append(f"UniPELT+prompt at or above its best single submodule ({name}, "
                     f"{best:.2f}): {'met' if uni >= best else 'missed'} "
                     f"(UniPELT+prompt {uni:.2f}, {uni - best:+.2f} points)")  # fmt: skip
    return lines


def markdown(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])

    atomic_write(path, write)


def write_report(
    records: list[dict], output: str | Path, title: str, order: list[str] | None = None
) -> str:
    """report.md, main.csv (+ fewshot.csv, dg.csv) and PNG plots in `output`, methods in
    `order`; returns the Markdown."""
    output = Path(output)
    summary = Summary(records, order)
    sections = [f"# {title}"]
    header, rows = main_rows(summary)
    sections += ["## Test scores (mean ± std over seeds)", markdown(header, rows)]
    _write_csv(output / "main.csv", header, rows)
    if summary.fewshot:
        header, rows = fewshot_rows(summary)
        sections += ["## Few-shot (mean over tasks and seeds)", markdown(header, rows)]
        _write_csv(output / "fewshot.csv", header, rows)
    if summary.dg:
        header, rows = dg_rows(summary)
        sections += ["## Domain generalisation (trained on the source, tested on each target)",
                     markdown(header, rows)]  # fmt: skip
        _write_csv(output / "dg.csv", header, rows)
    checks = goals(summary)
    if checks:
        sections += ["## Goals", "\n".join(f"- {line}" for line in checks)]
    from petlkit.bench.plots import plot_fewshot, plot_score_vs_params

    plot_score_vs_params(summary, output / "score_vs_params.png", title)
    if summary.fewshot:
        plot_fewshot(summary, output / "fewshot.png", title)
    text = "\n\n".join(sections) + "\n"
    _write_text(output / "report.md", text)
    return text
