"""A grid split over processes (`petlkit bench --shard I/N`): the shares cover every cell once,
and record lines appended by several processes at once stay whole."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from petlkit.bench import cells, read_records, run_grid
from petlkit.bench.grid import GridRunner, _locked, append_record, units
from petlkit.cli import main
from petlkit.errors import PetlError
from tests.helpers import tiny_preset


def small(backbone: str):
    return dataclasses.replace(tiny_preset(backbone), shots=(), dg={}, seeds=(0, 1))


def test_shards_share_the_grid_without_overlap(tiny_vit_file, tmp_path, monkeypatch):
    preset = small(tiny_vit_file)
    runners = [GridRunner(preset, tmp_path, None, print, (i, 3)) for i in range(3)]
    shares = [set(r.units) for r in runners]
    assert set().union(*shares) == set(units(preset)) and sum(map(len, shares)) == 6
    run_grid(preset, tmp_path, log=lambda _: None, shard=(0, 2))
    first = {r["cell"] for r in read_records(tmp_path)}
    assert first and first < {c.key for c in cells(preset)}  # half the grid, not all of it
    records = run_grid(preset, tmp_path, log=lambda _: None, shard=(1, 2))
    assert sorted(r["cell"] for r in records) == sorted(c.key for c in cells(preset))
    assert len(read_records(tmp_path, "selection.jsonl")) == len(units(preset)) * 3

    def refuse(*args, **kwargs):
        raise AssertionError("a cell another shard finished ran again")

    monkeypatch.setattr(GridRunner, "run_cell", refuse)
    monkeypatch.setattr(GridRunner, "trial", refuse)
    assert len(run_grid(preset, tmp_path, log=lambda _: None)) == len(records)  # all done


def test_an_append_waits_for_the_folders_lock(tmp_path):
    """While one process holds the record files (reading, or rewriting cut lines), another's
    append waits instead of landing in a file about to be replaced."""
    started = threading.Event()

    def other_process_appends():
        started.set()
        append_record(tmp_path, {"cell": "b"})

    with _locked(tmp_path):
        worker = threading.Thread(target=other_process_appends)
        worker.start()
        started.wait()
        time.sleep(0.3)
        assert not (tmp_path / "results.jsonl").exists()
        (tmp_path / "results.jsonl").write_text(json.dumps({"cell": "a"}) + "\n")
    worker.join(timeout=10)
    assert [r["cell"] for r in read_records(tmp_path)] == ["a", "b"]


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    record = {"cell": "x", "curve": [[step, 0.5] for step in range(400)]}  # about 5 kB

    def write(worker: int):
        for n in range(25):
            append_record(tmp_path, {**record, "cell": f"{worker}-{n}"})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["cell"] for line in lines) == sorted(
        f"{w}-{n}" for w in range(4) for n in range(25)
    )


def test_a_bad_shard_names_the_fix(tiny_vit_file, tmp_path, capsys):
    with pytest.raises(PetlError, match="0 <= I < N"):
        run_grid(small(tiny_vit_file), tmp_path, shard=(2, 2))
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "quick-vision", "--output", str(tmp_path), "--shard", "3"])
    assert "give I/N with 0 <= I < N" in capsys.readouterr().err


def test_the_sharded_script_runs_every_share_then_reports(tmp_path):
    """benchmarks/sharded_bench.sh: N processes on one folder, then the report of all."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1",
           "PETLKIT": f"{sys.executable} -m petlkit"}  # fmt: skip
    out = tmp_path / "grid"
    done = subprocess.run(
        [str(root / "benchmarks" / "sharded_bench.sh"), "quick-vision", str(out), "2",
         "--steps", "1", "--seeds", "0", "--methods", "linear", "lora"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(r["cell"] for r in read_records(out)) == [
        "mnist-5k--linear--seed0",
        "mnist-5k--lora--seed0",
    ]
    assert {p.name for p in out.glob("shard-*.log")} == {"shard-0.log", "shard-1.log"}
    assert "| lora |" in (out / "report.md").read_text() and "lora" in done.stdout
