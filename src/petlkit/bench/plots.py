"""PNG plots of a grid's results (matplotlib, no display needed)."""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from petlkit.bench.summary import Summary, points
from petlkit.io import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def suptitle(fig, title: str) -> None:
    """Lay the panels out (titles and axis labels of stacked panels apart), then put the
    figure's title, however many lines it wraps to, above them: its bottom edge at the figure's
    top, which the tight bounding box of `_save` then takes in."""
    fig.tight_layout()
    fig.suptitle(textwrap.fill(title, 120), fontsize=8, y=1.0, va="bottom")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_score_vs_params(summary: Summary, path: Path, title: str) -> None:
    """Mean test score against trainable parameters (log scale; methods with none at 1)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in summary.methods:
        mean = summary.mean(method)
        if mean is None:
            continue
        params = max(summary.params[method][0], 1)
        ax.scatter(params, mean, s=36)
        ax.annotate(method, (params, mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head excluded; log scale)")
    ax.set_ylabel("mean test score over tasks (points)")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_fewshot(summary: Summary, path: Path, title: str) -> None:
    """Score against shots per class, one panel per few-shot task, one line per method."""
    plt = _figure()
    tasks = list(dict.fromkeys(r["task"] for r in summary.fewshot))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in summary.fewshot:
            if r["task"] == task:
                curves[r["method"]][r["shots"]].append(points(r))
        for method, by_shots in curves.items():
            shots = sorted(by_shots)
            ax.plot(shots, [statistics.fmean(by_shots[k]) for k in shots], marker="o",
                    label=method)  # fmt: skip
        ax.set_xscale("log", base=2)
        ticks = sorted({k for by_shots in curves.values() for k in by_shots})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("training examples per class")
        ax.set_ylabel("test score (points)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    suptitle(fig, title)
    _save(fig, path)
    plt.close(fig)


def _panel(record: dict) -> str:
    """A convergence panel's title: the task, with its training-set size or shots per class."""
    if record.get("size") is not None:
        return f"{record['task']}, K = {record['size']}"
    if record.get("shots") is not None:
        return f"{record['task']}, {record['shots']}-shot"
    return record["task"]


def plot_convergence(records: list[dict], path: Path, title: str, key: str = "curve") -> None:
    """Validation score against training step at each method's chosen rate (seed 0), one panel
    per task: the evidence that a schedule is long enough. `key="loss_curve"`: the validation
    loss of language-model runs instead (the log of the perplexity; lower is better)."""
    loss = key == "loss_curve"
    runs = [r for r in records if r.get("seed") == 0 and len(r.get(key) or []) > 1]
    if not runs:
        return
    plt = _figure()
    panels = list(dict.fromkeys(_panel(r) for r in runs))
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for r in runs:
            if _panel(r) == panel:
                steps, values = zip(*r[key], strict=True)
                scale = 1 if loss else 100
                ax.plot(steps, [scale * v for v in values], label=f"{r['method']} ({r['lr']:g})")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (mean token NLL)" if loss else "validation score (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    suptitle(fig, title)
    _save(fig, path)
    plt.close(fig)
