"""benchmarks/schedule_probe.py: retrain a bench folder's seed-0 cells longer at their rates."""

import dataclasses
import statistics

import pytest

from petlkit.bench import presets
from petlkit.bench.grid import read_records, run_grid
from tests.helpers import benchmark_script, tiny_preset


@pytest.fixture
def probe():
    return benchmark_script("schedule_probe")


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


def test_the_low_resource_probe_retrains_k_cells_on_the_same_draw_and_reports_val_and_spread(
        probe, tiny_vit_file, tmp_path, monkeypatch, capsys):  # fmt: skip
    """`--size K` probes a text-lowres-like folder's K cells: the same K training examples (so
    the same validation draw), the rate the shorter run chose, and a table that gives the best
    validation score at both lengths and the seeds' std (a schedule is judged on those)."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), tasks={"digits": "natural-like"},
                                 shots=(), sizes=(20,), size_val=20)  # fmt: skip
    monkeypatch.setitem(presets.PRESETS, "tiny", preset)
    bench, out = tmp_path / "bench", tmp_path / "probe"
    shorter = {r["method"]: r for r in run_grid(preset, bench, log=lambda _: None)
               if r["seed"] == 0}  # fmt: skip
    argv = ["--bench", str(bench), "--preset", "tiny", "--task", "digits", "--steps", "6",
            "--output", str(out), "--methods", "sas", "lora"]  # fmt: skip
    assert probe.main([*argv, "--size", "50"]) == 2  # no K = 50 cells: said, nothing trained
    assert "no seed-0 K = 50 cell" in capsys.readouterr().err and not out.exists()
    assert probe.main([*argv, "--size", "20"]) == 0
    longer = {r["method"]: r for r in read_records(out)}
    assert sorted(longer) == ["lora", "sas"]
    for method, record in longer.items():
        assert record["size"] == 20 and record["steps"] == 6 and len(record["curve"]) == 6
        assert record["lr"] == shorter[method]["lr"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sas"))
    scores = [r["score"] for r in read_records(bench) if r["method"] == "sas"]
    std = 100 * statistics.stdev(scores)
    before_val = 100 * max(v for _, v in shorter["sas"]["curve"])
    after_val = 100 * max(v for _, v in longer["sas"]["curve"])
    assert f"| {before_val:.1f} → {after_val:.1f} |" in row and f"| {std:.1f} |" in row


def test_a_perplexity_probe_reports_perplexity_as_it_is_and_validation_as_loss(probe):
    """Perplexity is not a fraction: its test score and spread are shown as they are (not × 100)
    and its validation (the negated loss) as the loss in nats, lowest best."""
    record = {"metric": "perplexity", "score": 34.617, "curve": [[50, -3.7], [100, -3.516]],
              "task": "lm", "method": "lora", "shots": None, "size": None}  # fmt: skip
    other = {**record, "score": 35.617}
    assert probe.best_val(record) == "3.516"
    assert probe.seed_spread([record, other], record) == f"{statistics.stdev([34.617, 35.617]):.1f}"
    accuracy = {**record, "metric": "accuracy", "score": 0.8, "curve": [[50, 0.7], [100, 0.81]]}
    assert probe.best_val(accuracy) == "81.0"
    assert probe.seed_spread([accuracy, {**accuracy, "score": 0.9}], accuracy) == "7.1"
