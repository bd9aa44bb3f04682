"""`petlkit bench` resumes: a grid killed mid-selection or mid-write continues without repeating
or losing runs, and a folder written under another protocol or schedule is refused."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from petlkit.bench import MethodEntry, read_records, run_grid
from petlkit.bench.grid import GridRunner
from petlkit.bench.presets import narrowed
from petlkit.errors import PetlError
from tests.helpers import bench_record, tiny_preset


def test_a_grid_killed_mid_selection_resumes_without_repeating_runs(
    tiny_vit_file, tmp_path, monkeypatch
):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0, 1), shots=(), dg={},
                                 tasks={"digits": "natural-like"})  # fmt: skip
    reference = run_grid(preset, tmp_path / "reference", log=lambda _: None)
    calls = []
    original = GridRunner.trial

    def killed_after_four(self, unit, lr):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append((unit.key, lr))
        return original(self, unit, lr)

    monkeypatch.setattr(GridRunner, "trial", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_grid(preset, tmp_path / "run", log=lambda _: None)
    first = list(calls)
    monkeypatch.setattr(GridRunner, "trial", lambda self, unit, lr: (
        calls.append((unit.key, lr)), original(self, unit, lr))[1])  # fmt: skip
    records = run_grid(preset, tmp_path / "run", log=lambda _: None)
    assert len(calls) == len(set(calls)) == 9 and calls[:4] == first  # none repeated
    assert [(r["cell"], r["lr"], r["score"]) for r in records] == [
        (r["cell"], r["lr"], r["score"]) for r in reference
    ]


def test_results_of_the_fixed_rate_protocol_are_not_mixed_in(tiny_vit_file, tmp_path):
    (tmp_path / "results.jsonl").write_text(
        json.dumps(bench_record("digits", "sas", 0, 0.5, 1)) + "\n"
    )
    old = json.loads((tmp_path / "results.jsonl").read_text())
    del old["grid"]
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(PetlError, match="fixed-rate protocol.*new --output"):
        run_grid(tiny_preset(tiny_vit_file), tmp_path, log=lambda _: None)


def test_a_folder_run_with_another_schedule_is_refused(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"},
                                 methods={"sas": MethodEntry("sas", lr=1e-2)})  # fmt: skip
    run_grid(preset, tmp_path, log=lambda _: None)
    with pytest.raises(PetlError, match="ran 3 steps, this preset runs 5; write to a new"):
        run_grid(narrowed(preset, steps=5), tmp_path, log=lambda _: None)


def test_a_cell_cut_off_mid_write_runs_again(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"})  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    with pytest.warns(UserWarning, match="not a whole JSON line"):
        again = run_grid(preset, tmp_path, log=lambda _: None)
    assert sorted(r["cell"] for r in again) == sorted(r["cell"] for r in records)
    assert again[-1]["score"] == records[-1]["score"]  # same seed, same result


def test_a_first_record_cut_off_mid_write_is_dropped_before_anything_is_appended(
    tiny_vit_file, tmp_path
):
    """The file's only line is the cut one: the next line must not be glued onto it (and lost)."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"},
                                 methods={"sas": MethodEntry("sas", lr=1e-2)})  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    for name in ("results.jsonl", "selection.jsonl"):
        first = (tmp_path / name).read_text().splitlines()[0]
        (tmp_path / name).write_text(first[:20])  # killed while writing the first line
    with pytest.warns(UserWarning, match="not a whole JSON line"):
        again = run_grid(preset, tmp_path, log=lambda _: None)
    assert [r["score"] for r in again] == [r["score"] for r in records]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every line on disk is whole again
        assert read_records(tmp_path) == again
        assert len(read_records(tmp_path, "selection.jsonl")) == 3
