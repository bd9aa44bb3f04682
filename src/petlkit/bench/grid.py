"""Run a preset's grid resumably, each method at a learning rate chosen on validation data.

Two phases, both resumable:
1. Selection: per (task, method) — and per few-shot K or low-resource size — every rate of the
   grid (bench/selection.py) trains at seed 0 on a copy of the task without its test split; the
   best validation score picks the rate. Each finished trial appends a line to
   `<output>/selection.jsonl`. With the "val" rule the seed-0 trial at the chosen rate is the
   seed-0 cell: its saved weights are scored on test only now, after the choice.
2. Cells: every other seed (and, with the VTAB-1k "retrain" rule, every seed on train + val) at
   the chosen rate; each finished cell appends a line to `<output>/results.jsonl`.
A second run skips what is recorded; a run cut off mid-training resumes from its checkpoint in
`<output>/cells/<name>/`. Only small files stay once a cell is done. `shard=(i, n)` runs every
n-th (task, method) from the i-th: n processes with i = 0 … n − 1 share one output folder (on a
GPU, several grids at once); the record files are appended under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from petlkit.bench.presets import Preset
from petlkit.bench.revision import commit
from petlkit.bench.selection import Choice, choose, initial_grid, next_rate
from petlkit.bench.tasks import TaskCache, train_and_val, without_test
from petlkit.errors import PetlError, TrainingDiverged
from petlkit.io import atomic_write
from petlkit.methods.prompt import text_init_args
from petlkit.model import PetlModel, attach
from petlkit.run import RunSpec, build_for_task
from petlkit.tasks import Task
from petlkit.tasks.metrics import selection_value
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import BEST, METRICS_LOG, Trainer

RESULTS = "results.jsonl"
SELECTION = "selection.jsonl"
SELECTION_SEED = 0
LARGE_FILES = ("checkpoint.safetensors", BEST)
ZERO_SHOT = "zero-shot"  # a preset method that trains nothing: the base model scored as it is


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one learning rate is chosen for: a (task, method), at a few-shot K or a size."""

    task: str
    method: str  # the preset's label
    shots: int | None = None  # K examples per class (few-shot curves)
    size: int | None = None  # K training examples in all (low-resource setting)

    @property
    def key(self) -> str:
        shots = "" if self.shots is None else f"-{self.shots}shot"
        size = "" if self.size is None else f"-K{self.size}"
        return f"{self.task}{shots}{size}--{self.method}"

    def cell(self, seed: int) -> Cell:
        return Cell(self.task, self.method, seed, self.shots, self.size)

    def trial(self, lr: float) -> str:
        return f"select--{self.key}--lr{lr:g}"


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int
    shots: int | None = None
    size: int | None = None

    @property
    def unit(self) -> Unit:
        return Unit(self.task, self.method, self.shots, self.size)

    @property
    def key(self) -> str:
        return f"{self.unit.key}--seed{self.seed}"


def units(preset: Preset) -> list[Unit]:
    if preset.sizes:
        return [Unit(t, m, size=k) for k in preset.sizes for t in preset.tasks
                for m in preset.methods]  # fmt: skip
    out = [Unit(t, m) for t in preset.tasks for m in preset.methods] if preset.main else []
    few = [m for m in preset.methods if not preset.fewshot_methods or m in preset.fewshot_methods]
    out += [Unit(t, m, k) for k in preset.shots for t in preset.fewshot_tasks for m in few]
    return out


def cells(preset: Preset) -> list[Cell]:
    """Every cell, seed by seed (a cut-off grid holds whole seeds); the zero-shot base has one
    (nothing is trained, so every seed would score the same)."""
    return [u.cell(s) for s in preset.seeds for u in units(preset)
            if s == preset.seeds[0] or preset.methods[u.method].method != ZERO_SHOT]  # fmt: skip


def read_records(output: str | Path, name: str = RESULTS) -> list[dict]:
    path = Path(output) / name
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write: that cell reruns
            warnings.warn(
                f"{path}:{number} is not a whole JSON line; that cell will rerun", stacklevel=2
            )
    return records


@contextlib.contextmanager
def _locked(output: Path):
    """The folder's record files to this process alone (shards append to the same files)."""
    with open(output / ".grid.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_record(output: Path, record: dict, name: str = RESULTS) -> None:
    """Add one record line to a bench folder's file under its lock, synced to disk, so that
    shards and probes writing to one folder never cut each other's lines."""
    with _locked(output), open(output / name, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite(output: Path, name: str, records: list[dict]) -> None:
    """The file without lines cut by a kill, before new lines are appended (even when the cut
    line is the only one, so that the next line is not glued onto it)."""
    path = output / name
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.is_file() and path.read_text() != lines:
        atomic_write(path, lambda tmp: Path(tmp).write_text(lines))


class GridRunner:
    """One preset's grid in one output folder."""

    def __init__(self, preset: Preset, output: Path, data_dir: str | None, log,
                 shard: tuple[int, int] = (0, 1)) -> None:  # fmt: skip
        self.preset, self.output, self.log = preset, output, log
        self.tasks = TaskCache(preset, data_dir)
        self.data_dir = data_dir
        index, count = shard
        self.units = [u for i, u in enumerate(units(preset)) if i % count == index]
        self.cells = [c for c in cells(preset) if c.unit in self.units]

    # -- building ----------------------------------------------------------------------------
    def _trainer(self, task_name: str, task: Task, method: str, lr: float, seed: int,
                 folder: Path | None, unit: Unit, **overrides) -> Trainer:  # fmt: skip
        preset = self.preset
        entry = preset.methods[method]
        train = {**preset.train, "lr": lr, "seed": seed, **overrides}
        if unit.shots is not None and preset.fewshot_steps:
            train["steps"] = preset.steps_for(unit.shots)
        if unit.shots is not None and train.get("eval_every"):
            # a few-shot cell's curve gets at least five points, whatever the full-data cadence
            train["eval_every"] = min(train["eval_every"], max(train["steps"] // 5, 1))
        train["batch_size"] = min(train.get("batch_size", 32), len(task.splits["train"]))
        spec = RunSpec(backbone=preset.backbone, method=entry.method, task=task_name,
                       method_args=entry.args, train=train, pooling=preset.pooling,
                       data_dir=self.data_dir, image_size=preset.image_size,
                       resize=preset.resize)  # fmt: skip
        built = build_for_task(spec, task)
        if entry.method == ZERO_SHOT:
            model = PetlModel(built.model)  # no method: the base model as it is
        else:
            model = attach(built.model, entry.method, **text_init_args(entry.args, built.tokenizer))
        return Trainer(model, task, TrainConfig(**train), folder, built.tokenizer, progress=False)

    def _task(self, unit: Unit, seed: int) -> Task:
        return self.tasks.get(unit.task, unit.shots, seed, unit.size)

    # -- phase 1: selection ------------------------------------------------------------------
    def select(self, unit: Unit, trials: dict[str, dict]) -> Choice:
        entry = self.preset.methods[unit.method]
        if entry.method == ZERO_SHOT:  # no rate to choose
            return Choice(0.0, float("nan"), (), None)
        initial = initial_grid(entry)
        scores = {r["lr"]: r["val"] for r in trials.values() if r["unit"] == unit.key}
        while (lr := next_rate(scores, initial, self.preset.widen)) is not None:
            record = self.trial(unit, lr)
            append_record(self.output, record, SELECTION)
            trials[record["trial"]] = record
            scores[lr] = record["val"]
            shown = "diverged" if record["val"] is None else f"val {record['val']:.4f}"
            self.log(f"  select {unit.key} lr {lr:g}: {shown} ({record['seconds']:.0f} s)")
        return choose(scores)

    def trial(self, unit: Unit, lr: float) -> dict:
        folder = self.output / "cells" / unit.trial(lr)
        task = without_test(self._task(unit, SELECTION_SEED))
        trainer = self._trainer(unit.task, task, unit.method, lr, SELECTION_SEED, folder, unit)
        start = time.perf_counter()
        try:
            results = trainer.fit(resume=_fresh_or_resume(folder))
            val, best_step = selection_value(results["val"]), results["best_step"]
        except TrainingDiverged:
            val, best_step = None, None
        (folder / "checkpoint.safetensors").unlink(missing_ok=True)  # best.safetensors stays
        return {"trial": unit.trial(lr), "unit": unit.key, "task": unit.task,
                "method": unit.method, "shots": unit.shots, "size": unit.size, "lr": lr,
                "seed": SELECTION_SEED, "val": val, "best_step": best_step,
                "steps": trainer.config.steps, **_curves(folder),
                "seconds": round(time.perf_counter() - start, 1), "commit": commit()}  # fmt: skip

    # -- phase 2: cells ----------------------------------------------------------------------
    def seed0_from_trial(self, cell: Cell, choice: Choice, trial: dict) -> dict | None:
        """The seed-0 cell from the chosen trial's saved weights (None if they are gone)."""
        best = self.output / "cells" / cell.unit.trial(choice.lr) / BEST
        if trial["val"] is None or not best.is_file():
            return None
        task = self._task(cell.unit, cell.seed)
        trainer = self._trainer(cell.task, task, cell.method, choice.lr, cell.seed, None, cell.unit)
        trainer.load_trained(best)
        results = {"val": {"val": trial["val"]}, "test": trainer.evaluate("test"),
                   "best_step": trial["best_step"]}  # fmt: skip
        record = self._record(cell, choice, trainer, results, trial["seconds"], trial["curve"])
        return {**record, **{k: trial[k] for k in ("loss_curve",) if k in trial}}

    def run_cell(self, cell: Cell, choice: Choice) -> dict:
        folder = self.output / "cells" / cell.key
        task = self._task(cell.unit, cell.seed)
        if self.preset.methods[cell.method].method == ZERO_SHOT:
            return self._zero_shot(cell, choice, task)
        overrides = {}
        if self.preset.selection == "retrain":
            task, overrides = train_and_val(task), {"eval_every": 0}
        trainer = self._trainer(cell.task, task, cell.method, choice.lr, cell.seed, folder,
                                cell.unit, **overrides)  # fmt: skip
        start = time.perf_counter()
        results = trainer.fit(resume=_fresh_or_resume(folder))
        seconds, curves = round(time.perf_counter() - start, 1), _curves(folder)
        record = self._record(cell, choice, trainer, results, seconds, curves.pop("curve"))
        record.update(curves)  # a language-model run's loss curve
        for name in LARGE_FILES:
            (folder / name).unlink(missing_ok=True)
        return record

    def _zero_shot(self, cell: Cell, choice: Choice, task: Task) -> dict:
        trainer = self._trainer(cell.task, task, cell.method, 1e-3, cell.seed, None, cell.unit)
        start = time.perf_counter()
        results = {"val": trainer.evaluate("val"), "test": trainer.evaluate("test"),
                   "best_step": 0}  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        record = self._record(cell, choice, trainer, results, seconds, [])
        return {**record, "steps": 0, "trainable": 0, "percent": 0.0}  # it trains nothing

    def _record(self, cell: Cell, choice: Choice, trainer: Trainer, results: dict,
                seconds: float, curve: list) -> dict:  # fmt: skip
        preset, count = self.preset, trainer.model.trainable_parameters()
        record = {
            "cell": cell.key, "preset": preset.name, "backbone": preset.backbone,
            "task": cell.task, "group": preset.tasks.get(cell.task, "few-shot"),
            "method": cell.method, "seed": cell.seed, "shots": cell.shots, "size": cell.size,
            "metric": next(iter(results["test"])), "score": next(iter(results["test"].values())),
            "val": selection_value(results["val"]), "best_step": results["best_step"],
            **choice.to_record(), "selection": preset.selection,
            "selection_seed": SELECTION_SEED, "curve": curve,
            "trainable": count.trainable, "percent": count.percent,
            "steps": trainer.config.steps, "seconds": seconds, "commit": commit(),
        }  # fmt: skip
        if cell.shots is None and cell.size is None and cell.task in preset.dg:
            record["dg"] = {
                target: next(iter(Trainer(trainer.model, self.tasks.get(target), trainer.config,
                                          None, trainer.tokenizer, progress=False)
                                  .evaluate("test").values()))
                for target in preset.dg[cell.task]
            }  # fmt: skip
        return record

    # -- the whole grid ----------------------------------------------------------------------
    def run(self) -> list[dict]:
        self.output.mkdir(parents=True, exist_ok=True)
        with _locked(self.output):
            records, trial_list = read_records(self.output), read_records(self.output, SELECTION)
            old = [r["cell"] for r in records if "grid" not in r]
            if old:
                raise PetlError(f"{self.output} holds {len(old)} cells from the fixed-rate "
                                f"protocol (no learning-rate grid, e.g. {old[0]}); write to a "
                                "new --output folder")  # fmt: skip
            _rewrite(self.output, RESULTS, records)
            _rewrite(self.output, SELECTION, trial_list)
        self._check_steps([*records, *trial_list])
        done = {r["cell"] for r in records}
        trials = {r["trial"]: r for r in trial_list}
        grid = self.cells
        self.log(f"{self.preset.name}: {sum(c.key in done for c in grid)} of {len(grid)} cells "
                 f"done; {len(trials)} selection runs recorded")  # fmt: skip
        choices = {}
        reuse = self.preset.selection == "val" and SELECTION_SEED in self.preset.seeds
        for unit in self.units:
            choice = choices[unit.key] = self.select(unit, trials)
            cell = unit.cell(SELECTION_SEED)
            if reuse and cell.key not in done:
                trial = trials.get(unit.trial(choice.lr))  # none for the zero-shot base
                record = trial and self.seed0_from_trial(cell, choice, trial)
                self._finish(record or self.run_cell(cell, choice), done)
            self._forget_trials(unit, choice)
        for cell in grid:
            if cell.key not in done:
                self._finish(self.run_cell(cell, choices[cell.unit.key]), done)
        return read_records(self.output)

    def _check_steps(self, recorded: list[dict]) -> None:
        """Refuse a folder whose runs had another schedule (their choices would not carry)."""
        preset = self.preset
        for r in recorded:
            if r.get("steps") == 0:
                continue  # the zero-shot base trains no step (its column may be left out)
            expected = preset.steps_for(r.get("shots"))
            if expected is not None and r.get("steps") != expected:
                name = r.get("cell") or r.get("trial")
                raise PetlError(f"{self.output}: {name} ran {r.get('steps')} steps, this preset "
                                f"runs {expected}; write to a new --output folder")  # fmt: skip

    def _finish(self, record: dict, done: set[str]) -> None:
        append_record(self.output, record)
        done.add(record["cell"])
        edge = f", best rate at the grid's {record['edge']} edge" if record["edge"] else ""
        mine = sum(c.key in done for c in self.cells)
        self.log(f"[{mine}/{len(self.cells)}] {record['cell']}: lr {record['lr']:g}"
                 f"{edge}, {record['metric']} {record['score']:.4f}")  # fmt: skip

    def _forget_trials(self, unit: Unit, choice: Choice) -> None:
        """The selection runs' weights, once the seed-0 cell no longer needs them."""
        for lr in choice.grid:
            (self.output / "cells" / unit.trial(lr) / BEST).unlink(missing_ok=True)


def _fresh_or_resume(folder: Path) -> bool:
    """Resume a run cut off after a checkpoint; otherwise start clean (no stale log lines)."""
    if (folder / "checkpoint.safetensors").is_file():
        return True
    shutil.rmtree(folder, ignore_errors=True)
    return False


def _curves(folder: Path) -> dict[str, list[list[float]]]:
    """From a run's metrics log: `curve`, [step, validation score] at every evaluation, and, for
    a language-model run, `loss_curve`, [step, validation loss] (the log of its perplexity)."""
    path = folder / METRICS_LOG
    curve, loss = [], []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val" in record:
            curve.append([record["step"], round(selection_value(record["val"]), 6)])
            if "perplexity" in record["val"]:
                loss.append([record["step"], round(math.log(record["val"]["perplexity"]), 6)])
    return {"curve": curve, **({"loss_curve": loss} if loss else {})}


def run_grid(
    preset: Preset,
    output: str | Path,
    data_dir: str | None = None,
    log=None,
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Choose each rate on validation data, then run every cell (of this shard) not yet in
    `<output>/results.jsonl`; return all records of the folder."""
    log = log or functools.partial(print, flush=True)
    if preset.needs_data_dir and data_dir is None:
        raise PetlError(f"preset {preset.name!r} reads the benchmark's files: pass --data-dir")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise PetlError(f"shard {index}/{count}: give I/N with 0 <= I < N (e.g. 0/4 … 3/4)")
    commit()  # stamp the code as it is now: an edit made while the grid runs did not run
    return GridRunner(preset, Path(output), data_dir, log, shard).run()
