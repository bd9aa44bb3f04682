"""The papers' claims checked on a grid's results, and which methods are best per task.

Every comparison uses one rule: two methods tie when their means differ by at most the larger
of their two stds over seeds; per task, a method meets the best of its rivals on that task.
"""

from __future__ import annotations

import statistics

from petlkit.bench.summary import Summary, mean_std, verdict

# each UniPELT variant and the single methods it combines (He/Mao et al., UniPELT, 2022)
UNIPELT_SUBMODULES = {
    "unipelt-ap": ("adapter", "prefix"),
    "unipelt": ("lora", "adapter", "prefix"),
    "unipelt-prompt": ("lora", "adapter", "prefix", "prompt"),
}


def _versus(summary: Summary, a: str, b: str) -> str:
    """`a` against `b` on the mean over tasks: ahead, behind or a tie (within one std)."""
    (ma, sa), (mb, sb) = summary.overall(a), summary.overall(b)
    diff = ma - mb
    said = verdict(summary.better(diff), sa, sb)
    said = f"tie ({diff:+.1f}, within one std)" if said == "tie" else f"{said} by {abs(diff):.1f}"
    return f"{a} {ma:.1f} ± {sa:.1f} vs {b} {mb:.1f} ± {sb:.1f}: {said}"


def _per_task(summary: Summary, a: str, rivals: list[str]) -> str:
    """`a` against the best of `rivals` on each task (by its seed mean there), with the same
    one-std tie rule: the tally, the mean difference and each task's difference."""
    diffs, verdicts = [], []
    for task in summary.tasks:
        present = [m for m in rivals if summary.scores[m].get(task)]
        if not summary.scores[a].get(task) or not present:
            continue
        best = max(present, key=lambda m: summary.better(summary.task_mean(m, task)))
        (ma, sa), (mb, sb) = mean_std(summary.scores[a][task]), mean_std(summary.scores[best][task])
        diffs.append((task, best, ma - mb))
        verdicts.append(verdict(summary.better(ma - mb), sa, sb))
    if len(diffs) < 2:
        return ""
    tally = ", ".join(f"{v} {verdicts.count(v)}" for v in ("ahead", "tie", "behind"))
    higher = sum(summary.better(d) > 0 for _, _, d in diffs)
    mean = statistics.fmean(d for _, _, d in diffs)
    named = len(rivals) > 1
    each = "; ".join(f"{t} {d:+.1f}" + (f" ({b})" if named else "") for t, b, d in diffs)
    word = "higher" if summary.sign > 0 else "lower"  # the better side
    return (f"; per task: {tally} of {len(diffs)}, {word} mean on {higher}, "
            f"mean difference {mean:+.1f} ({each})")  # fmt: skip


def _check(summary: Summary, a: str, b: str, rivals: list[str] | None = None) -> str:
    """`a` against `b` on the mean over tasks, then per task against the best of `rivals`."""
    return _versus(summary, a, b) + _per_task(summary, a, rivals or [b])


def claims(summary: Summary) -> list[str]:
    """The papers' claims, checked on these results: on the mean over tasks and, where there
    are several tasks, on each task against the rival best there (ties within one std)."""
    has = {m for m in summary.methods if summary.mean(m) is not None}
    lines = []
    if {"sas", "lora"} <= has:
        ratio = summary.params["sas"][0] / max(summary.params["lora"][0], 1)
        lines.append(f"SaS vs LoRA ({ratio:.2f}× LoRA's parameters): "
                     f"{_check(summary, 'sas', 'lora')}")  # fmt: skip
    for part in ("sas-shared", "sas-specific"):
        if {"sas", part} <= has:
            lines.append(f"SaS shared+specific vs {part.removeprefix('sas-')} only: "
                         f"{_check(summary, 'sas', part)}")  # fmt: skip
    for combined, parts in UNIPELT_SUBMODULES.items():
        singles = [m for m in parts if m in has]
        if combined in has and singles:
            best = max(singles, key=lambda m: summary.better(summary.overall(m)[0]))
            lines.append(f"{combined} vs its best single submodule: "
                         f"{_check(summary, combined, best, singles)}")  # fmt: skip
    if {"unipelt-prompt", "unipelt"} <= has:
        lines.append(f"the prompt layer: {_check(summary, 'unipelt-prompt', 'unipelt')}")
    return lines


def task_best_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Per method: on how many tasks it has the best seed mean, and on how many it is the best
    or within one std of it (the larger of the two stds), as in the ranking."""
    counts = {m: [0, 0] for m in summary.methods}
    for task in summary.tasks:
        scored = [m for m in summary.methods if summary.scores[m].get(task)]
        if not scored:
            continue
        best = max(scored, key=lambda m: summary.better(summary.task_mean(m, task)))
        best_mean, best_std = mean_std(summary.scores[best][task])
        counts[best][0] += 1
        for method in scored:
            mean, std = mean_std(summary.scores[method][task])
            counts[method][1] += verdict(mean - best_mean, std, best_std) == "tie"
    n = len(summary.tasks)
    ordered = sorted(counts.items(), key=lambda item: (-item[1][1], -item[1][0]))
    rows = [[m, f"{best} of {n}", f"{near} of {n}"] for m, (best, near) in ordered]
    return ["method", "best mean on", "best or tied (within one std) on"], rows
