"""Learning-rate grids and the choice on validation data.

Each (task, method) gets a grid of rates on a half-decade ladder. Every rate trains at the
selection seed; the highest validation score wins (the lower rate on a tie). A winner at an edge
of the grid tried so far, strictly better than its neighbour, grows the grid by one rung on that
side, at most `widen` times; a winner still at an edge after that is reported as an edge choice,
never hidden. A grid where every rate diverged steps down the same way (divergence says the
rates were too high).
"""

from __future__ import annotations

import dataclasses
import math

from petlkit.bench.presets import MethodEntry

LADDER = tuple(float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 3))  # 1e-7, 3e-7, ... 3e0


def rung(lr: float) -> int:
    """The ladder position closest to `lr` (in log space)."""
    return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


def initial_grid(entry: MethodEntry) -> tuple[float, ...]:
    if entry.lrs:
        return tuple(sorted(entry.lrs))
    i = rung(entry.lr)
    return tuple(LADDER[j] for j in (i - 1, i, i + 1) if 0 <= j < len(LADDER))


def _beyond(lr: float, side: int) -> float | None:
    """The ladder rung past `lr` on `side` (-1 lower, +1 higher), or None off the ladder."""
    i = rung(lr) + side
    return LADDER[i] if 0 <= i < len(LADDER) else None


@dataclasses.dataclass(frozen=True)
class Choice:
    lr: float
    val: float
    grid: tuple[float, ...]  # every rate tried, ascending
    edge: str | None  # "low" or "high": the best rate is the grid's edge after widening

    def to_record(self) -> dict:
        return {"lr": self.lr, "val_at_choice": self.val, "grid": list(self.grid),
                "edge": self.edge}  # fmt: skip


def best_rate(scores: dict[float, float | None]) -> tuple[float, float]:
    """The rate with the highest score (a diverged run scores None); the lower rate on a tie."""
    finite = {lr: s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not finite:
        lowest = min(scores)
        return lowest, float("nan")
    lr = max(sorted(finite), key=lambda r: finite[r])  # max keeps the first (lowest) of ties
    return lr, finite[lr]


def next_rate(
    scores: dict[float, float | None], initial: tuple[float, ...], widen: int
) -> float | None:
    """The next rate to try, or None when the choice is made."""
    missing = [lr for lr in initial if lr not in scores]
    if missing:
        return missing[0]
    best, _ = best_rate(scores)
    tried = sorted(scores)
    below = [r for r in tried if r < initial[0]]  # the rungs widening has added on each side
    above = [r for r in tried if r > initial[-1]]
    if not any(s is not None and math.isfinite(s) for s in scores.values()):
        # every rate diverged: too high, so step down the ladder (at most `widen` rungs)
        lower = _beyond(tried[0], -1)
        return lower if len(below) < widen and lower is not None else None
    if len(tried) < 2:
        return None
    for side, end, inner, extra in (
        (-1, tried[0], tried[1], below),
        (1, tried[-1], tried[-2], above),
    ):
        # grow only past an edge that beats its neighbour (a flat grid gives no direction)
        if best != end or len(extra) >= widen:
            continue
        if scores[inner] is None or scores[end] > scores[inner]:
            candidate = _beyond(end, side)
            if candidate is not None and candidate not in scores:
                return candidate
    return None


def choose(scores: dict[float, float | None]) -> Choice:
    """The choice once `next_rate` has nothing left to try."""
    lr, val = best_rate(scores)
    tried = tuple(sorted(scores))
    edge = None
    if len(tried) > 1 and lr == tried[0]:
        edge = "low"
    elif len(tried) > 1 and lr == tried[-1]:
        edge = "high"
    return Choice(lr, val, tried, edge)
