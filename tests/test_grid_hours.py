"""benchmarks/grid_hours.py: the CPU hours a finished bench grid took, and would take idle."""

import json

import pytest

from tests.helpers import benchmark_script


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def grid(tmp_path):
    """Three rate trials of LoRA (one slowed by another job), its seed-0 cell (reusing the
    chosen trial's weights and seconds), two more seeds (scoring the test set too), and the
    zero-shot base (no trial: a run of its own)."""
    _write(
        tmp_path / "selection.jsonl",
        [
            {"method": "lora", "lr": lr, "seed": 0, "seconds": s}
            for lr, s in ((1e-4, 100.0), (3e-4, 100.0), (1e-3, 300.0))
        ],
    )
    _write(tmp_path / "results.jsonl", [
        {"method": "zero-shot", "seed": 0, "seconds": 20.0},
        {"method": "lora", "seed": 0, "seconds": 100.0},
        {"method": "lora", "seed": 1, "seconds": 120.0},
        {"method": "lora", "seed": 2, "seconds": 121.0}])  # fmt: skip
    return tmp_path


def test_trials_and_cells_that_trained_anew_are_told_apart(grid):
    runs = benchmark_script("grid_hours").runs(grid)
    assert runs["lora"] == ([100.0, 100.0, 300.0], [120.0, 121.0], 3)  # seed 0 reused a trial
    assert runs["zero-shot"] == ([], [20.0], 1)


def test_the_idle_estimate_counts_each_kind_of_run_at_its_uncontended_time(grid, capsys):
    hours = benchmark_script("grid_hours")
    assert hours.typical([100.0, 100.0, 300.0]) == 100.0  # the slowed trial is left out
    assert hours.typical([60.0, 120.0, 121.0, 122.0, 900.0]) == 120.5  # one short, one slow
    # two trials beyond the chosen one, three cells each scoring the test set
    assert hours.idle_seconds([100.0, 100.0, 300.0], [120.0, 121.0], 3) == 2 * 100 + 3 * 120.5
    hours.main([str(grid)])
    out = capsys.readouterr().out
    assert "| lora | 3 | 3 | 0.21 | 100 | 120 | 0.16 |" in out  # 741 s recorded, 561.5 idle
    assert "| zero-shot | 0 | 1 | 0.01 | – | 20 | 0.01 |" in out
    assert out.rstrip().endswith("total: 0.2 h recorded, 0.2 h on an idle machine")
