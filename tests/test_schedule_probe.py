"""benchmarks/schedule_probe.py: retrain a bench folder's seed-0 cells longer at their rates."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from petlkit.bench import presets
from petlkit.bench.grid import read_records, run_grid
from tests.helpers import tiny_preset

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "schedule_probe.py"


@pytest.fixture
def probe():
    spec = importlib.util.spec_from_file_location("schedule_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_few_shot_probe_retrains_each_k_at_its_chosen_rate_for_the_longer_schedule(
        probe, tiny_vit_file, tmp_path, monkeypatch, capsys):  # fmt: skip
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), main=False,
                                 fewshot_steps=3)  # fmt: skip
    monkeypatch.setitem(presets.PRESETS, "tiny", preset)
    bench, out = tmp_path / "bench", tmp_path / "probe"
    shorter = {r["shots"]: r for r in run_grid(preset, bench, log=lambda _: None)}
    argv = ["--bench", str(bench), "--preset", "tiny", "--task", "digits", "--steps", "6",
            "--output", str(out)]  # fmt: skip
    assert probe.main(argv) == 2  # this folder has no full-data cell: said, nothing trained
    assert "no seed-0 full-data cell" in capsys.readouterr().err and not out.exists()
    assert probe.main([*argv, "--fewshot"]) == 0
    longer = {r["shots"]: r for r in read_records(out)}
    assert sorted(longer) == [1, 2]
    for k, record in longer.items():
        assert record["steps"] == 6 and record["lr"] == shorter[k]["lr"]
    table = capsys.readouterr().out
    assert "| method | K | lr |" in table and "| sas | 2 |" in table
    assert probe.main([*argv, "--fewshot"]) == 0  # a rerun trains nothing again
    assert len(read_records(out)) == 2
