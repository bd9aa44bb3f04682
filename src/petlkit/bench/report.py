"""Tables (Markdown + CSV), plots (PNG) and claim checks (with ties) from a grid's records.

Scores are shown in points (0–100): accuracy, MCC and correlations × 100; SQuAD EM/F1 as they are.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from petlkit.bench.claims import claims, task_best_rows
from petlkit.bench.summary import Summary, mean_std, points, verdict
from petlkit.io import atomic_write
from petlkit.tasks.metrics import LOWER_IS_BETTER


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
                mean, std = mean_std(values)
                row.append(f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}")
            else:
                row.append("–")
        means = [summary.mean(method, ts) for ts in groups.values()] if len(groups) > 1 else []
        means.append(summary.mean(method))
        row += ["–" if m is None else f"{m:.1f}" for m in means]
        rows.append(row)
    return header, rows


def fewshot_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Per method, one row per few-shot task and one for their mean; per K, mean ± std over
    seeds (the mean row's std: over the per-seed means across tasks)."""
    shots = sorted({r["shots"] for r in summary.fewshot})
    tasks = list(dict.fromkeys(r["task"] for r in summary.fewshot))
    by_seed: dict[tuple[str, int], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in summary.fewshot:
        by_seed[(r["method"], r["shots"])][r["task"]][r["seed"]] = points(r)
    methods = list(dict.fromkeys(r["method"] for r in summary.fewshot))
    rows = []
    for method in methods:
        for task in [*tasks, "mean"] if len(tasks) > 1 else tasks:
            row = [method, task]
            for k in shots:
                cell = by_seed.get((method, k), {})
                if task == "mean":
                    common = set.intersection(*(set(cell.get(t, {})) for t in tasks))
                    values = [statistics.fmean(cell[t][s] for t in tasks) for s in sorted(common)]
                else:
                    values = list(cell.get(task, {}).values())
                row.append(_mean_std_text(values))
            rows.append(row)
    return ["method", "task", *(f"{k}-shot" for k in shots)], rows


def _mean_std_text(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def fewshot_edges(records: list[dict]) -> str | None:
    """The few-shot rates chosen at an edge of their grid (after widening), or None."""
    edges = [f"{r['method']} on {r['task']}, {r['shots']}-shot: {r['lr']:g} "
             f"({'lowest' if r['edge'] == 'low' else 'highest'} of {len(r['grid'])} tried)"
             for r in records if r.get("shots") is not None and r.get("edge")
             and r.get("seed") == r.get("selection_seed", 0)]  # fmt: skip
    if not edges:
        return None
    return "Rates chosen at the edge of their grid: " + "; ".join(edges) + "."


def dg_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Per method: each source's own test score, the same weights on each target, and the
    mean over targets."""
    pairs = list(dict.fromkeys((r["task"], t) for r in summary.dg for t in r["dg"]))
    sources = list(dict.fromkeys(source for source, _ in pairs))
    header = ["method"]
    for source in sources:
        targets = [t for s, t in pairs if s == source]
        header += [f"{source} (source)"] + [f"→ {t}" for t in targets]
        header += [f"{source} → mean of {len(targets)}"] if len(targets) > 1 else []
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in summary.dg:
        scores[r["method"]][f"{r['task']} (source)"].append(points(r))
        for target, value in r["dg"].items():
            scores[r["method"]][f"→ {target}"].append(100 * value)
        if len(r["dg"]) > 1:
            mean = 100 * statistics.fmean(r["dg"].values())
            scores[r["method"]][f"{r['task']} → mean of {len(r['dg'])}"].append(mean)
    rows = []
    for method in summary.methods:
        if method not in scores:
            continue
        row = [method]
        for column in header[1:]:
            values = scores[method].get(column)
            if not values:
                row.append("–")
            else:
                mean, std = mean_std(values)
                row.append(f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}")
        rows.append(row)
    return header, rows


def ranking_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Methods by their mean over tasks, each against the best: "best", "tie" or the gap."""
    scored = [(m, *summary.overall(m)) for m in summary.methods if summary.mean(m) is not None]
    scored.sort(key=lambda item: -summary.sign * item[1])
    rows = []
    for method, mean, std in scored:
        best, best_mean, best_std = scored[0]
        gap = mean - best_mean
        if method == best:
            said = "best"
        elif verdict(gap, std, best_std) == "tie":
            said = f"tie ({gap:+.1f})"
        else:
            said = f"{gap:+.1f}"
        several = len(summary.seeds(method)) > 1
        rows.append([method, f"{mean:.1f} ± {std:.1f}" if several else f"{mean:.1f}", said])
    return ["method", "mean over tasks", "vs best (tie: within one std)"], rows


def rate_rows(records: list[dict], summary: Summary) -> tuple[list[str], list[list[str]]]:
    """The learning rate chosen on validation per (method, task); an edge choice is marked."""
    chosen = {(r["method"], r["task"]): r for r in records if "lr" in r and r.get("shots") is None}
    rows = []
    for method in summary.methods:
        row = [method]
        for task in summary.tasks:
            r = chosen.get((method, task))
            if r is None:
                row.append("–")
                continue
            if not r.get("grid"):  # the zero-shot base: nothing trained
                row.append("–")
                continue
            mark = {"low": " (lowest tried)", "high": " (highest tried)"}.get(r.get("edge"), "")
            row.append(f"{r['lr']:g}{mark}")
        row.append(_grids_tried(chosen, method, summary.tasks))
        rows.append(row)
    return ["method", *summary.tasks, "grid tried"], rows


def _grids_tried(chosen: dict, method: str, tasks: list[str]) -> str:
    """The rates a method tried: one grid, or, where its grid differs between tasks, each
    task's grid named in the tasks' order."""
    grids = {t: tuple(chosen[(method, t)]["grid"]) for t in tasks
             if "grid" in chosen.get((method, t), {})}  # fmt: skip
    if not grids:
        return "–"
    spell = {t: ", ".join(f"{x:g}" for x in g) for t, g in grids.items()}
    if len(set(grids.values())) == 1:
        return next(iter(spell.values()))
    return "; ".join(f"{t}: {text}" for t, text in spell.items())


PLATEAU_POINTS = 2.0  # a run whose best val score in its last third beats the rest by more
TAIL = 1 / 3  # is still rising: the last third of a cosine schedule is its low-rate tail


def convergence_line(records: list[dict]) -> str | None:
    """How many seed-0 runs had plateaued: the best validation score of the schedule's last
    third against the best before it (in points). A run that rose for two thirds of its steps
    and then stayed flat has plateaued; one that still gains in the low-rate tail has not."""
    gains, late = [], []
    for r in records:
        curve = r.get("curve") or []
        if len(curve) < 4 or r.get("seed") != 0:
            continue
        cut = curve[-1][0] * (1 - TAIL)
        before = max(100 * v for step, v in curve if step <= cut)
        tail = max(100 * v for step, v in curve if step > cut)
        gains.append(tail - before)
        if tail - before > PLATEAU_POINTS:
            shots = f", {r['shots']}-shot" if r.get("shots") is not None else ""
            late.append(f"{r['method']} on {r['task']}{shots} (+{tail - before:.1f})")
    if not gains:
        return None
    shown = "; ".join(late[:8]) + (f"; and {len(late) - 8} more" if len(late) > 8 else "")
    loss = all(r["metric"] in LOWER_IS_BETTER for r in records)  # validated on -loss, in nats
    unit = "; a point here is 0.01 nat of validation loss, about 1 % of perplexity" if loss else ""
    return (f"{len(gains) - len(late)} of {len(gains)} seed-0 runs had plateaued (their best "
            f"validation score in the last third of the schedule is within {PLATEAU_POINTS:g} "
            f"points of the best before it{unit})" + (f"; still rising: {shown}" if late else "")
            + ". Curves: convergence.png.")  # fmt: skip


COLLAPSE_POINTS = 10.0  # a run whose last val score is this far below its best fell away


def best_point(curve: list) -> tuple[int, float]:
    """The (step, validation score) a run keeps: the highest score, the earliest step on a tie."""
    step, score = max(curve, key=lambda point: (point[1], -point[0]))
    return step, score


def collapse_line(records: list[dict]) -> str | None:
    """The runs (any seed) whose validation score ended more than COLLAPSE_POINTS below their
    best, e.g. to one class for every example. A run keeps its best step, so such a run's test
    score is an early checkpoint's, and its seed's spread measures instability, not level."""
    fell = []
    for r in records:
        curve = r.get("curve") or []
        if len(curve) < 2:
            continue
        best_step, best = best_point(curve)
        last_step, last = curve[-1]
        if 100 * (best - last) > COLLAPSE_POINTS:
            at = (f", {r['shots']}-shot" if r.get("shots") is not None else
                  f", K = {r['size']}" if r.get("size") is not None else "")  # fmt: skip
            fell.append(f"{r['method']} on {r['task']}{at}, seed {r['seed']} ({100 * best:.1f} "
                        f"at step {best_step}, {100 * last:.1f} at {last_step})")  # fmt: skip
    if not fell:
        return None
    return (f"{len(fell)} of {len(records)} runs fell away (the validation score ended more "
            f"than {COLLAPSE_POINTS:g} points below the run's best; its test score is the best "
            f"step's): " + "; ".join(fell) + ".")  # fmt: skip


# reported in issue #16: a fresh clone's demo against the README's demo table (another machine)
MACHINE_GAP_SEEN = 1.8


def variance_note(records: list[dict]) -> str:
    """How far these figures move between runs: the seed-to-seed spread measured in this run,
    the yardstick for a run on another machine (whose float rounding differs)."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        cells[(r["method"], r["task"], r.get("shots"), r.get("size"))].append(points(r))
    spreads = [statistics.stdev(v) for v in cells.values() if len(v) > 1]
    if not spreads:
        return ("These figures come from one seed; another machine rounds floats differently; "
                f"we have seen differences of up to {MACHINE_GAP_SEEN} points.")  # fmt: skip
    mean = statistics.fmean(spreads)
    return (f"How much these figures move: a second seed changes a cell by {mean:.1f} "
            f"points on average (std over seeds, up to {max(spreads):.1f}). Another machine rounds "
            "floats differently, which perturbs training like a new seed: expect differences of "
            f"that size from the README's table (we have seen up to {MACHINE_GAP_SEEN} points "
            "between two machines).")  # fmt: skip


def markdown(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def seeds_phrase(summary: Summary) -> str:
    """The seeds a table averages, and the cells with fewer (a grid cut off part-way): a method
    short by the same seeds on every task is named once, else each short task is named."""

    def spell(seeds: set[int]) -> str:
        return ", ".join(str(seed) for seed in sorted(seeds))

    cells = {(m, t): summary.seeds(m, t) for m in summary.methods for t in summary.tasks}
    every = set().union(*cells.values())
    short = []
    for method in (m for m in summary.methods if m not in summary.untrained):
        own = [cells[method, task] for task in summary.tasks]
        if all(seeds == own[0] for seeds in own) and own[0] != every:
            short.append(f"{method} {spell(own[0])}")
            continue
        short += [f"{method} on {task} {spell(cells[method, task]) or 'none'}"
                  for task in summary.tasks if cells[method, task] != every]  # fmt: skip
    phrase = f"seed{'s' if len(every) > 1 else ''} {spell(every)}"
    if summary.untrained:  # the base model as it is: no seed changes its score
        phrase += f"; {', '.join(summary.untrained)} scored once, as it trains nothing"
    return phrase + (f"; so far only: {'; '.join(short)}" if short else "")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])

    atomic_write(path, write)


def write_report(
    records: list[dict],
    output: str | Path,
    title: str,
    order: list[str] | None = None,
    *,
    brief: bool = False,
) -> str:
    """report.md, CSV tables and PNG plots in `output`, methods in `order`; returns the
    Markdown (`brief`: only the tables a user reads first, for the demo)."""
    output = Path(output)
    sizes = sorted({r["size"] for r in records if r.get("size") is not None})
    sections = [f"# {title}"]
    if sizes:  # low-resource: one table per K
        for size in sizes:
            part = [r for r in records if r.get("size") == size]
            sections += _main_sections(part, output, order, brief, f"K = {size}", f"-K{size}")
    else:
        sections += _main_sections(records, output, order, brief, "", "")
    summary = Summary([r for r in records if r.get("size") is None], order)
    if summary.fewshot and not brief:
        header, rows = fewshot_rows(summary)
        sections += ["## Few-shot (mean ± std over seeds; rate chosen per task and K on "
                     "validation)", markdown(header, rows)]  # fmt: skip
        extra = [fewshot_edges(records), convergence_line(summary.fewshot)]
        sections += [line for line in extra if line]
        _write_csv(output / "fewshot.csv", header, rows)
    if summary.dg and not brief:
        header, rows = dg_rows(summary)
        sections += ["## Domain generalisation (trained on the source, scored unchanged on each "
                     "target; mean over seeds)", markdown(header, rows)]  # fmt: skip
        _write_csv(output / "dg.csv", header, rows)
    from petlkit.bench.plots import plot_convergence, plot_fewshot, plot_score_vs_params

    if summary.tasks:
        plot_score_vs_params(summary, output / "score_vs_params.png", title)
    if summary.fewshot:
        plot_fewshot(summary, output / "fewshot.png", title)
    plot_convergence(records, output / "convergence.png", title)
    if any(r.get("loss_curve") for r in records):
        plot_convergence(records, output / "validation_loss.png", title, key="loss_curve")
    text = "\n\n".join(sections) + "\n"
    _write_text(output / ("summary.md" if brief else "report.md"), text)
    return text


def _main_sections(records: list[dict], output: Path, order: list[str] | None, brief: bool,
                   label: str, suffix: str) -> list[str]:  # fmt: skip
    summary = Summary(records, order)
    if not summary.tasks:
        return []
    at = f", {label}" if label else ""
    header, rows = main_rows(summary)
    _write_csv(output / f"main{suffix}.csv", header, rows)
    sections = [f"## Test scores{at} (mean ± std over {seeds_phrase(summary)}, each method at the "
                "rate chosen on validation)", markdown(header, rows)]  # fmt: skip
    if len(summary.tasks) > 1 or not brief:
        header, rows = ranking_rows(summary)
        sections += [f"## Ranking{at}", markdown(header, rows)]
    if len(summary.tasks) > 1 and not brief:
        header, rows = task_best_rows(summary)
        sections += [f"## Best per task{at}", markdown(header, rows)]
    header, rows = rate_rows(records, summary)
    sections += [f"## Learning rates chosen on validation{at} (seed 0)", markdown(header, rows)]
    if brief:
        return sections
    main = [r for r in records if r.get("shots") is None]
    lines = [line for line in (convergence_line(main), collapse_line(main)) if line]
    if lines:
        sections += [f"## Convergence{at}", "\n\n".join(lines)]
    lines = claims(summary)
    if lines:
        sections += [f"## The papers' claims{at}", "\n".join(f"- {x}" for x in lines)]
    return sections
