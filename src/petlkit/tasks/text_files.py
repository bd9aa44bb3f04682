"""Domain text tasks from the user's own files: a folder with train, val (or dev) and test files,
each JSONL or CSV, with a `text` column (or `text_a` and `text_b` for pairs) and either `label`
(classification; the labels found in train, sorted, become class ids) or `score` (regression)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task

SPLIT_FILES = {"train": ("train",), "val": ("val", "dev"), "test": ("test",)}


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PetlError(f"{path}:{line_no}: not a JSON object ({err})") from err
        return rows
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in (".jsonl", ".csv"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def text_files_task(folder: str | Path, name: str | None = None) -> Task:
    folder = Path(folder)
    paths = {split: _find(folder, stems) for split, stems in SPLIT_FILES.items()}
    for split in ("train", "val"):
        if paths[split] is None:
            raise PetlError(f"{folder} has no {split} file; expected {SPLIT_FILES[split][0]}.jsonl "
                            "or .csv")  # fmt: skip
    records = {split: read_records(path) for split, path in paths.items() if path is not None}
    first = records["train"][0] if records["train"] else {}
    pair = "text_a" in first
    text_keys = ("text_a", "text_b") if pair else ("text",)
    target = "score" if "score" in first else "label"
    classes = sorted({str(r.get("label")) for r in records["train"]}) if target == "label" else []
    splits = {}
    for split, rows in records.items():
        texts, labels = [], []
        for i, row in enumerate(rows, start=1):
            missing = [k for k in (*text_keys, target) if k not in row]
            if missing:
                raise PetlError(
                    f"{paths[split]}: record {i} has no {missing[0]!r} column; columns must be "
                    f"{list(text_keys)} and 'label' or 'score'"
                )
            parts = tuple(str(row[k]).strip() for k in text_keys)
            if not all(parts):
                raise PetlError(f"{paths[split]}: record {i} has an empty text")
            if target == "score":
                labels.append(float(row["score"]))
            elif str(row["label"]) in classes:
                labels.append(classes.index(str(row["label"])))
            else:
                raise PetlError(f"{paths[split]}: record {i} has label {row['label']!r}, which "
                                f"the train file never uses (labels: {classes})")  # fmt: skip
            texts.append(parts if pair else parts[0])
        dtype = torch.float32 if target == "score" else torch.long
        splits[split] = Split(texts, torch.tensor(labels, dtype=dtype))
    if target == "score":
        return Task(name or folder.name, "text", 1, splits, "correlation", pair=pair)
    return Task(name or folder.name, "text", len(classes), splits, pair=pair)
