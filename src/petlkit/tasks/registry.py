"""Task names → loaded tasks. Every here-scale task reads real data from an installed package."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task
from petlkit.tasks.glue import GLUE, glue_task
from petlkit.tasks.images import fewshot_task, vtab_task
from petlkit.tasks.text_files import text_files_task

VTAB_TRAIN, VTAB_VAL = 800, 200  # VTAB-1k: 1,000 training examples, 800 train + 200 val


def rotten_tomatoes() -> Task:
    from petlkit.data.rotten_tomatoes import load_rotten_tomatoes

    data = load_rotten_tomatoes()
    splits = {
        name: Split(list(split.texts), torch.tensor(split.labels)) for name, split in data.items()
    }
    return Task("rotten-tomatoes", "text", 2, splits)


def digits(seed: int = 0) -> Task:
    """scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels) as a VTAB-1k-style task:
    1,000 examples for training (800 train + 200 val), the other 797 for test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = {
        "train": order[:VTAB_TRAIN],
        "val": order[VTAB_TRAIN : VTAB_TRAIN + VTAB_VAL],
        "test": order[VTAB_TRAIN + VTAB_VAL :],
    }
    splits = {name: Split(images[i], labels[i]) for name, i in parts.items()}
    return Task("digits", "vision", 10, splits, image_size=8, channels=1)


def sentiment(domain: str, regression: bool) -> Task:
    """A human-rated sentiment domain: the mean rating (regression) or its sign (binary)."""
    from petlkit.data.vader import split_domain

    splits = {}
    for name, rows in split_domain(domain).items():
        if regression:
            splits[name] = Split([t for t, _ in rows], torch.tensor([r for _, r in rows]))
        else:
            kept = [(t, int(r > 0)) for t, r in rows if r != 0]
            splits[name] = Split([t for t, _ in kept], torch.tensor([y for _, y in kept]))
    kind = "score" if regression else "binary"
    if regression:
        return Task(f"sentiment-{domain}-{kind}", "text", 1, splits, "correlation")
    return Task(f"sentiment-{domain}-{kind}", "text", 2, splits)


TASKS: dict[str, Callable[[], Task]] = {"rotten-tomatoes": rotten_tomatoes, "digits": digits}
for _domain in ("movies", "tweets", "products"):
    for _regression, _kind in ((False, "binary"), (True, "score")):
        TASKS[f"sentiment-{_domain}-{_kind}"] = partial(sentiment, _domain, _regression)
FILE_TASKS = (*(f"glue-{name}" for name in GLUE), "text-files")  # read from the user's files
# plus vtab-<task> and fewshot-<dataset>, named by the folders under --data-dir


def task_names() -> list[str]:
    return sorted([*TASKS, *FILE_TASKS])


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    resolution: int = 224,
) -> Task:
    """A task by name. File-based tasks read `data_dir`: GLUE (`glue-<task>`, `shots`: K-shot
    low-resource training sampled with `seed`), VTAB-1k (`vtab-<task>`) and NOAH few-shot
    (`fewshot-<dataset>`, with `shots` and `seed`), images resized to `resolution`."""
    if name == "text-files":
        if data_dir is None:
            raise PetlError(
                "text-files reads your train/val/test JSONL or CSV files: pass --data-dir"
            )
        return text_files_task(data_dir)
    if name.startswith(("vtab-", "fewshot-")):
        if data_dir is None:
            raise PetlError(
                f"{name} reads image files: pass --data-dir (the folder of task folders)"
            )
        if name.startswith("vtab-"):
            return vtab_task(data_dir, name.removeprefix("vtab-"), resolution)
        if shots is None:
            raise PetlError(f"{name} needs --shots (the K of the few-shot split files)")
        return fewshot_task(data_dir, name.removeprefix("fewshot-"), shots, seed, resolution)
    if name in FILE_TASKS:
        if data_dir is None:
            raise PetlError(
                f"{name} reads the official GLUE TSV files: pass --data-dir, the folder that "
                "holds CoLA/, SST-2/, MRPC/, ..."
            )
        return glue_task(name.removeprefix("glue-"), data_dir, shots=shots, seed=seed)
    if name not in TASKS:
        raise PetlError(f"unknown task {name!r}; valid tasks: {task_names()}")
    return TASKS[name]()
