"""GLUE from its official TSV files (the layout `download_glue_data.py` writes: one folder per task
with train.tsv and dev.tsv; MNLI with dev_matched.tsv and dev_mismatched.tsv).

Splits follow UniPELT's protocol (Mao et al., 2022): 1,000 training examples are held out as the
validation split (model selection), GLUE's dev set is the test split, and the low-resource setting
samples K training examples from the rest (`shots=K`), all from a seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task

HELD_OUT = 1000
NLI = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueSpec:
    text: tuple[str | int, ...]  # column names, or indices for header-less files (CoLA)
    label: str | int
    labels: tuple[str, ...] | None  # None: a regression score
    metric: str
    header: bool = True
    dev: tuple[str, ...] = ("dev.tsv",)


GLUE = {
    "cola": GlueSpec((3,), 1, ("0", "1"), "mcc", header=False),
    "sst2": GlueSpec(("sentence",), "label", ("0", "1"), "accuracy"),
    "mrpc": GlueSpec(("#1 String", "#2 String"), "Quality", ("0", "1"), "f1_accuracy"),
    "qqp": GlueSpec(("question1", "question2"), "is_duplicate", ("0", "1"), "f1_accuracy"),
    "stsb": GlueSpec(("sentence1", "sentence2"), "score", None, "correlation"),
    "mnli": GlueSpec(
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        "accuracy",
        dev=("dev_matched.tsv", "dev_mismatched.tsv"),
    ),  # fmt: skip
    "qnli": GlueSpec(("question", "sentence"), "label", NLI, "accuracy"),
    "rte": GlueSpec(("sentence1", "sentence2"), "label", NLI, "accuracy"),
    "wnli": GlueSpec(("sentence1", "sentence2"), "label", ("0", "1"), "accuracy"),
}
FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
           "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}  # fmt: skip


def read_glue_tsv(path: Path, spec: GlueSpec) -> Split:
    if not path.is_file():
        raise PetlError(f"no GLUE file at {path}; expected the official layout ({spec.dev[0]}, "
                        "train.tsv in one folder per task)")  # fmt: skip
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows) if spec.header else None
        columns = [*spec.text, spec.label]
        if header is not None:
            missing = [c for c in columns if c not in header]
            if missing:
                raise PetlError(f"{path} has no column {missing[0]!r}; its columns: {header}")
            columns = [header.index(c) for c in columns]
        for line, row in enumerate(rows, start=2 if header else 1):
            if len(row) <= max(columns):
                raise PetlError(f"{path}:{line}: {len(row)} fields, expected {max(columns) + 1}")
            parts = [row[c].strip() for c in columns[:-1]]
            if any(not p for p in parts):
                raise PetlError(f"{path}:{line}: empty text")
            value = row[columns[-1]].strip()
            if spec.labels is None:
                labels.append(float(value))
            elif value in spec.labels:
                labels.append(spec.labels.index(value))
            else:
                raise PetlError(
                    f"{path}:{line}: unknown label {value!r}; valid: {list(spec.labels)}"
                )
            texts.append(parts[0] if len(parts) == 1 else tuple(parts))
    dtype = torch.float32 if spec.labels is None else torch.long
    return Split(texts, torch.tensor(labels, dtype=dtype))


def glue_task(
    name: str,
    data_dir: str | Path,
    shots: int | None = None,
    seed: int = 0,
    held_out: int = HELD_OUT,
) -> Task:
    """GLUE task `name` read from `data_dir` (the folder holding CoLA/, SST-2/, ...)."""
    if name not in GLUE:
        raise PetlError(f"unknown GLUE task {name!r}; valid: {sorted(GLUE)}")
    spec = GLUE[name]
    folder = Path(data_dir) / FOLDERS[name]
    train = read_glue_tsv(folder / "train.tsv", spec)
    if len(train) <= held_out:
        raise PetlError(f"{folder / 'train.tsv'} has {len(train)} examples; {held_out} are held "
                        "out for validation, so it needs more")  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    rest = order[held_out:]
    if shots is not None:
        if shots > len(rest):
            raise PetlError(f"shots={shots} but only {len(rest)} training examples remain")
        rest = rest[:shots]
    splits = {"train": train.subset(rest), "val": train.subset(order[:held_out])}
    tests = [read_glue_tsv(folder / dev, spec) for dev in spec.dev]
    splits["test"] = tests[0]
    if len(tests) > 1:
        splits["test_mismatched"] = tests[1]
    num_labels = 1 if spec.labels is None else len(spec.labels)
    return Task(f"glue-{name}", "text", num_labels, splits, spec.metric, pair=len(spec.text) > 1)
