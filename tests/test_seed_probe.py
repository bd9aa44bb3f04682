"""benchmarks/seed_probe.py: retrain one (task, method) of a bench folder at another rate."""

import dataclasses

import pytest

from petlkit.bench import presets
from petlkit.bench.grid import SELECTION, read_records, run_grid
from tests.helpers import benchmark_script, tiny_preset


@pytest.fixture
def probe():
    return benchmark_script("seed_probe")


def test_the_probe_retrains_each_seed_at_the_given_rate_on_the_grids_schedule(
        probe, tiny_vit_file, tmp_path, monkeypatch, capsys):  # fmt: skip
    """Each seed is the grid's own cell at the probe's rate: the grid's schedule, the rate the
    user gave, the validation score the grid's selection saw at that rate (when it tried it),
    and a table row per seed with both runs; a rerun trains nothing again."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), tasks={"digits": "natural-like"},
                                 shots=(), dg={})  # fmt: skip
    monkeypatch.setitem(presets.PRESETS, "tiny", preset)
    bench, out = tmp_path / "bench", tmp_path / "probe"
    run_grid(preset, bench, log=lambda _: None)
    grid = {r["seed"]: r for r in read_records(bench) if r["method"] == "sas"}
    tried = {t["lr"]: t["val"] for t in read_records(bench, SELECTION) if t["method"] == "sas"}
    other = next(lr for lr in tried if lr != grid[0]["lr"])
    argv = ["--bench", str(bench), "--preset", "tiny", "--task", "digits", "--lr", str(other),
            "--seeds", "0", "1", "--output", str(out), "--method"]  # fmt: skip
    assert probe.main([*argv, "ssf"]) == 2  # not in the folder
    assert "no full-data cell of 'ssf'" in capsys.readouterr().err and not out.exists()
    assert probe.main([*argv, "sas"]) == 0
    probed = {r["seed"]: r for r in read_records(out)}
    assert sorted(probed) == [0, 1]
    for seed, record in probed.items():
        assert record["lr"] == other and record["grid"] == [other]
        assert record["steps"] == grid[seed]["steps"] and record["val_at_choice"] == tried[other]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    last = 100 * probed[1]["curve"][-1][1]
    assert len(rows) == 1 and rows[0].endswith(f"| {last:.1f} | {100 * probed[1]['score']:.1f} |")
    assert f"| {100 * grid[1]['score']:.1f} |" in rows[0]
    assert probe.main([*argv, "sas"]) == 0  # nothing trained again
    assert len(read_records(out)) == 2


def test_the_description_reads_the_best_and_the_last_validation_score_off_the_curve(probe):
    """A run that collapsed shows it: best early, last at the floor it fell to."""
    record = {"curve": [[30, 0.665], [60, 0.57], [90, 0.525]], "best_step": 30, "val": 0.665,
              "score": 0.678}  # fmt: skip
    assert probe.describe(record) == "66.5 @ 30 | 52.5 | 67.8"
    assert probe.describe(None) == "– | – | –"
