"""Domain text tasks from the user's own files: a folder with train, val (or dev) and test files,
each JSONL or CSV, with a `text` column (or `text_a` and `text_b` for pairs) and either `label`
(classification: macro-F1, then accuracy) or `score` (regression); a file with both needs
`target`. The validation file may be named val, validation or dev. Files are UTF-8 (a spreadsheet's
byte-order mark is dropped) unless `encoding` names another.

Class ids: the labels found in train, sorted: numerically when every label is a number (so 10
comes after 9, and 1 and 1.0 are one class), else as text. The task keeps the names
(`label_names`), which adapters record, so predictions map back to the data's labels."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task

SPLIT_FILES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}
TARGETS = ("label", "score")


def _text(path: Path, encoding: str) -> str:
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return path.read_text(encoding=codec)
    except UnicodeDecodeError as err:
        raise PetlError(
            f"{path} is not {encoding} text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8 or name its encoding (--encoding latin-1)"
        ) from err
    except LookupError as err:
        raise PetlError(f"unknown encoding {encoding!r}; use a Python codec name") from err


def read_records(path: Path, encoding: str = "utf-8") -> list[dict]:
    text = _text(path, encoding)
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PetlError(f"{path}:{line_no}: not a JSON object ({err})") from err
                if not isinstance(rows[-1], dict):
                    raise PetlError(f"{path}:{line_no}: not a JSON object")
        return rows
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in (".jsonl", ".csv"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def text_files_task(
    folder: str | Path,
    name: str | None = None,
    encoding: str = "utf-8",
    target: str | None = None,
) -> Task:
    folder = Path(folder)
    if target is not None and target not in TARGETS:
        raise PetlError(f"unknown target {target!r}; use one of {list(TARGETS)}")
    paths = {split: _find(folder, stems) for split, stems in SPLIT_FILES.items()}
    for split in ("train", "val"):
        if paths[split] is None:
            names = " or ".join(f"{s}.jsonl/.csv" for s in SPLIT_FILES[split])
            raise PetlError(f"{folder} has no {split} file; expected {names}")
    records = {split: read_records(path, encoding) for split, path in paths.items() if path}
    for split, rows in records.items():
        if not rows:
            raise PetlError(f"{paths[split]} holds no records; add examples or remove the file")
    first = records["train"][0]
    pair = "text_a" in first
    text_keys = ("text_a", "text_b") if pair else ("text",)
    if target is None:
        if "score" in first and "label" in first:
            raise PetlError(
                f"{paths['train']} has both 'label' and 'score' columns; say which to learn: "
                "--target label (classification) or --target score (regression)"
            )
        target = "score" if "score" in first else "label"
    classes = _classes(records["train"], paths["train"]) if target == "label" else []
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
                score = _number(row["score"])
                if score is None:
                    raise PetlError(f"{paths[split]}: record {i} has score {row['score']!r}, not "
                                    "a number; scores must be numbers")  # fmt: skip
                labels.append(score)
            elif _label_key(row["label"], paths[split], i) in classes:
                labels.append(classes.index(_label_key(row["label"], paths[split], i)))
            else:
                raise PetlError(f"{paths[split]}: record {i} has label {row['label']!r}, which "
                                f"the train file never uses (labels: {classes})")  # fmt: skip
            texts.append(parts if pair else parts[0])
        dtype = torch.float32 if target == "score" else torch.long
        splits[split] = Split(texts, torch.tensor(labels, dtype=dtype))
    if target == "score":
        return Task(name or folder.name, "text", 1, splits, "correlation", pair=pair)
    return Task(name or folder.name, "text", len(classes), splits, "macro_f1", pair=pair,
                label_names=tuple(classes))  # fmt: skip


def _label_key(value, path: Path, record: int) -> str:
    """A label as one canonical string: numbers written as 1, 1.0 or "1" are the same class."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PetlError(f"{path}: record {record} has no label (null or empty); give every record "
                        "a label or drop it")  # fmt: skip
    number = _number(value)
    if number is None:
        return str(value).strip()
    return str(int(number)) if number.is_integer() else repr(number)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _classes(rows: list[dict], path: Path) -> list[str]:
    """The train file's labels, sorted numerically when they are all numbers, else as text."""
    keys = {_label_key(r.get("label"), path, i) for i, r in enumerate(rows, start=1)}
    if all(_number(k) is not None for k in keys):
        return sorted(keys, key=float)
    return sorted(keys)
