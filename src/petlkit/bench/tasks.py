"""The tasks a benchmark grid trains on: loaded once per grid, with the val/test limits of
its preset, few-shot and low-resource samples, the copy without test that learning-rate
selection sees, and VTAB-1k's train + val for the retrain rule."""

from __future__ import annotations

import dataclasses

import torch

from petlkit.bench.presets import Preset
from petlkit.errors import PetlError
from petlkit.run import fit_to_backbone
from petlkit.tasks import Task, load_task
from petlkit.tasks.base import Split
from petlkit.tasks.images import ImageFiles


class TaskCache:
    """Tasks loaded once per grid (the same splits for every method and seed)."""

    def __init__(self, preset: Preset, data_dir: str | None) -> None:
        self.preset, self.data_dir, self._tasks = preset, data_dir, {}

    def get(self, name: str, shots: int | None = None, seed: int = 0,
            size: int | None = None) -> Task:  # fmt: skip
        if name.startswith("fewshot-"):  # NOAH's own split file per (shots, seed)
            task = load_task(name, self.data_dir, shots, seed, self.preset.image_size)
            return _limit_eval(task, self.preset)
        if name not in self._tasks:
            task = load_task(name, self.data_dir, resolution=self.preset.image_size)
            task = fit_to_backbone(task, self.preset.backbone, self.preset.resize)
            if self.preset.selection == "retrain" and "train800val200" not in task.splits:
                task = _with_train_and_val(task)  # before val is cut to val_limit
            self._tasks[name] = _limit_eval(task, self.preset)
        task = self._tasks[name]
        if size is not None:
            return _low_resource(task, size, self.preset.size_val, seed)
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


def _low_resource(task: Task, size: int, val_size: int, seed: int) -> Task:
    """UniPELT's low-resource setting: `size` training examples drawn with `seed`, and
    validation drawn from the remaining training examples; test unchanged."""
    train = task.splits["train"]
    if size + val_size > len(train):
        raise PetlError(f"task {task.name!r} has {len(train)} training examples, fewer than K = "
                        f"{size} plus {val_size} for validation; use a smaller K")  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    splits = {**task.splits, "train": train.subset(order[:size].sort().values),
              "val": train.subset(order[size : size + val_size].sort().values)}  # fmt: skip
    return dataclasses.replace(task, splits=splits)


def without_test(task: Task) -> Task:
    """The task as learning-rate selection sees it: no test split at all."""
    return dataclasses.replace(task, splits={k: v for k, v in task.splits.items() if k != "test"})


def _with_train_and_val(task: Task) -> Task:
    """The task with one more split, train + val, under VTAB-1k's name for it."""
    train, val = task.splits["train"], task.splits["val"]
    if isinstance(train.inputs, torch.Tensor):
        inputs = torch.cat([train.inputs, val.inputs])
    elif isinstance(train.inputs, ImageFiles):  # files read when used: join the lists
        inputs = dataclasses.replace(train.inputs, paths=train.inputs.paths + val.inputs.paths)
    else:
        inputs = [*train.inputs, *val.inputs]
    both = Split(inputs, torch.cat([train.labels, val.labels]))
    return dataclasses.replace(task, splits={**task.splits, "train800val200": both})


def train_and_val(task: Task) -> Task:
    """VTAB-1k's retrain rule: train on train + val (its train800val200 split)."""
    if "train800val200" not in task.splits:
        task = _with_train_and_val(task)
    return dataclasses.replace(task, splits={**task.splits, "train": task.splits["train800val200"]})
