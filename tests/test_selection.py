"""The learning-rate rule on its own, without training: the ladder, widening past a winning
edge, flagging an edge choice, and what divergence does to the choice."""

from __future__ import annotations

import math

import pytest

from petlkit.bench import MethodEntry
from petlkit.bench.selection import LADDER, choose, initial_grid, next_rate, rung


@pytest.mark.parametrize(
    ("peak", "expected_grid", "edge"),
    [
        (3e-3, (1e-3, 3e-3, 1e-2), None),  # inside the grid: no widening
        (3e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), None),  # past the top: grows, finds the peak
        (1.0, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "high"),  # still rising after 2 rungs: flagged
        (1e-5, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "low"),
    ],
)
def test_the_grid_widens_past_an_edge_then_flags_it(peak, expected_grid, edge):
    def val(lr):  # a score that peaks at `peak`
        return -abs(math.log10(lr) - math.log10(peak))

    entry = MethodEntry("lora", lr=3e-3)
    initial = initial_grid(entry)
    assert initial == (1e-3, 3e-3, 1e-2)
    scores = {}
    while (lr := next_rate(scores, initial, widen=2)) is not None:
        scores[lr] = val(lr)
    choice = choose(scores)
    assert choice.grid == expected_grid and choice.edge == edge
    assert choice.lr == max(scores, key=scores.get)


def test_a_flat_grid_is_not_widened_and_its_edge_choice_is_reported():
    scores = {1e-3: 0.5, 3e-3: 0.5, 1e-2: 0.5}  # nothing learned at any rate
    assert next_rate(scores, (1e-3, 3e-3, 1e-2), widen=2) is None
    assert choose(scores).edge == "low"


def test_when_every_rate_diverges_the_grid_steps_down():
    """Divergence says the rates are too high: lower rungs are tried (up to `widen`) until one
    trains; if none does, the lowest is kept and flagged."""
    initial = (1e-3, 3e-3, 1e-2)
    scores = {1e-3: None, 3e-3: None, 1e-2: float("nan")}
    assert next_rate(scores, initial, widen=2) == 3e-4
    scores[3e-4] = 0.6  # it trains, and beats its diverged neighbour: the edge rule goes on
    assert next_rate(scores, initial, widen=2) == 1e-4
    scores[1e-4] = 0.5
    assert next_rate(scores, initial, widen=2) is None
    choice = choose(scores)
    assert (choice.lr, choice.val, choice.edge) == (3e-4, 0.6, None)  # inside the grid
    hopeless = {1e-3: None, 3e-3: None, 1e-2: None, 3e-4: None, 1e-4: None}
    assert next_rate(hopeless, initial, widen=2) is None  # two rungs down, still diverging
    choice = choose(hopeless)
    assert choice.lr == 1e-4 and math.isnan(choice.val) and choice.edge == "low"


def test_a_diverged_rate_is_recorded_and_never_chosen():
    scores = {1e-3: 0.7, 3e-3: 0.8, 1e-2: None}  # None: the loss became NaN
    assert next_rate(scores, (1e-3, 3e-3, 1e-2), widen=2) is None
    choice = choose(scores)
    assert (choice.lr, choice.val, choice.edge) == (3e-3, 0.8, None)
    assert rung(0.0031) == rung(3e-3) and LADDER[rung(3e-3) + 1] == 1e-2
