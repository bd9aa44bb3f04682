"""Run a preset's grid of tasks × methods × seeds (and few-shot cells), resumably.

Every finished cell appends one JSON line to `<output>/results.jsonl`; a second run skips cells
already there, and a cell cut off mid-training resumes from its own checkpoint in
`<output>/cells/<cell>/`. Only small files stay once a cell is done (its metrics and results).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch

from petlkit.bench.presets import Preset
from petlkit.bench.revision import commit
from petlkit.errors import PetlError
from petlkit.io import atomic_write
from petlkit.model import attach
from petlkit.run import RunSpec, build_for_task, fit_to_backbone
from petlkit.tasks import Task, load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer

RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str  # the preset's label
    seed: int
    shots: int | None = None

    @property
    def key(self) -> str:
        shots = "" if self.shots is None else f"-{self.shots}shot"
        return f"{self.task}{shots}--{self.method}--seed{self.seed}"


def cells(preset: Preset) -> list[Cell]:
    """The main table's cells seed by seed (a cut-off grid holds whole seeds), then the
    few-shot ones."""
    out = [Cell(t, m, s) for s in preset.seeds for t in preset.tasks for m in preset.methods]
    few = [m for m in preset.methods if not preset.fewshot_methods or m in preset.fewshot_methods]
    for s in preset.seeds:
        out += [Cell(t, m, s, k) for k in preset.shots for t in preset.fewshot_tasks for m in few]
    return out


def read_records(output: str | Path) -> list[dict]:
    path = Path(output) / RESULTS
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


def _append(output: Path, record: dict) -> None:
    with open(output / RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class TaskCache:
    """Tasks loaded once per grid (the same splits for every method and seed)."""

    def __init__(self, preset: Preset, data_dir: str | None) -> None:
        self.preset, self.data_dir, self._tasks = preset, data_dir, {}

    def get(self, name: str, shots: int | None = None, seed: int = 0) -> Task:
        if name.startswith("fewshot-"):  # NOAH's own split file per (shots, seed)
            task = load_task(name, self.data_dir, shots, seed, self.preset.image_size)
            return _limit_eval(task, self.preset)
        if name not in self._tasks:
            task = load_task(name, self.data_dir, resolution=self.preset.image_size)
            task = fit_to_backbone(task, self.preset.backbone)
            self._tasks[name] = _limit_eval(task, self.preset)
        task = self._tasks[name]
        if shots is None:
            return task
        return dataclasses.replace(
            task, splits={**task.splits, "train": task.splits["train"].k_shot(shots, seed)}
        )


def _limit_eval(task: Task, preset: Preset) -> Task:
    """At most the preset's number of val and test examples: a fixed random subset, the same
    for every cell."""
    splits = dict(task.splits)
    for name, limit in (("val", preset.val_limit), ("test", preset.eval_limit)):
        if name in splits and limit is not None and len(splits[name]) > limit:
            order = torch.randperm(len(splits[name]), generator=torch.Generator().manual_seed(0))
            splits[name] = splits[name].subset(order[:limit].sort().values)
    return dataclasses.replace(task, splits=splits)


def run_cell(preset: Preset, cell: Cell, tasks: TaskCache, folder: Path) -> dict:
    entry = preset.methods[cell.method]
    train = {**preset.train, "lr": entry.lr, "seed": cell.seed}
    if cell.shots is not None and preset.fewshot_steps:
        train["steps"] = preset.fewshot_steps
    spec = RunSpec(backbone=preset.backbone, method=entry.method, task=cell.task,
                   method_args=entry.args, train=train, pooling=preset.pooling,
                   data_dir=tasks.data_dir, image_size=preset.image_size)  # fmt: skip
    if cell.task == "squad":  # its windows depend on the tokenizer
        built, task = spec.build_and_load()
    else:
        task = tasks.get(cell.task, cell.shots, cell.seed)
        built = build_for_task(spec, task)
    train["batch_size"] = min(train.get("batch_size", 32), len(task.splits["train"]))
    model = attach(built.model, entry.method, **entry.args)
    config = TrainConfig(**train)
    trainer = Trainer(model, task, config, folder, built.tokenizer, progress=False)
    start = time.perf_counter()
    results = trainer.fit(resume=(folder / "checkpoint.safetensors").is_file())
    record = {
        "cell": cell.key, "preset": preset.name, "backbone": preset.backbone,
        "task": cell.task, "group": preset.tasks.get(cell.task, "few-shot"),
        "method": cell.method, "seed": cell.seed, "shots": cell.shots,
        "metric": next(iter(results["test"])), "score": next(iter(results["test"].values())),
        "val": next(iter(results["val"].values())),
        "trainable": results["trainable_parameters"], "percent": results["trainable_percent"],
        "steps": config.steps, "seconds": round(time.perf_counter() - start, 1),
        "commit": commit(),
    }  # fmt: skip
    if cell.shots is None and cell.task in preset.dg:
        record["dg"] = {
            target: next(iter(Trainer(model, tasks.get(target), config, None, built.tokenizer,
                                      progress=False).evaluate("test").values()))
            for target in preset.dg[cell.task]
        }  # fmt: skip
    for name in ("checkpoint.safetensors", "best.safetensors"):  # large; the record is kept
        (folder / name).unlink(missing_ok=True)
    return record


def run_grid(
    preset: Preset, output: str | Path, data_dir: str | None = None, log=None
) -> list[dict]:
    """Run every cell not yet in `<output>/results.jsonl`; return all records."""
    log = log or functools.partial(print, flush=True)
    if preset.needs_data_dir and data_dir is None:
        raise PetlError(f"preset {preset.name!r} reads the benchmark's files: pass --data-dir")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    records = read_records(output)
    if records:  # rewritten whole, so a line cut by a kill is gone before new ones are added
        lines = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(output / RESULTS, lambda tmp: Path(tmp).write_text(lines))
    done = {r["cell"] for r in records}
    grid = cells(preset)
    todo = [c for c in grid if c.key not in done]
    total = len(grid)
    log(f"{preset.name}: {total - len(todo)} of {total} cells done; running {len(todo)}")
    tasks = TaskCache(preset, data_dir)
    for number, cell in enumerate(todo, total - len(todo) + 1):
        record = run_cell(preset, cell, tasks, output / "cells" / cell.key)
        _append(output, record)
        log(f"[{number}/{total}] {cell.key}: {record['metric']} {record['score']:.4f} "
            f"({record['seconds']:.0f} s)")  # fmt: skip
    return read_records(output)
