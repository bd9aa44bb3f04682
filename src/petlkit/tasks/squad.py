"""SQuAD 1.1: the official JSON reader and the official EM / F1 (answer normalisation: lower case,
no punctuation, no articles a/an/the, single spaces; best score over the gold answers)."""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from petlkit.errors import PetlError


@dataclass(frozen=True)
class SquadExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]  # character offsets of the answers in the context


def read_squad(path: str | Path) -> list[SquadExample]:
    path = Path(path)
    if not path.is_file():
        raise PetlError(f"no SQuAD file at {path} (expected e.g. train-v1.1.json, dev-v1.1.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PetlError(f"{path} is not a SQuAD 1.1 JSON file (no 'data' list): {err}") from err
    examples = []
    for article in data:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                starts = tuple(int(a["answer_start"]) for a in qa["answers"])
                for text, start in zip(answers, starts, strict=True):
                    if context[start : start + len(text)] != text:
                        raise PetlError(f"{path}: question {qa['id']}: answer {text!r} is not at "
                                        f"offset {start} of its context")  # fmt: skip
                examples.append(SquadExample(qa["id"], qa["question"], context, answers, starts))
    return examples


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], examples: list[SquadExample]) -> dict[str, float]:
    """{'exact_match', 'f1'} in percent; a question without a prediction scores 0."""
    if not examples:
        raise PetlError("no SQuAD examples to score")
    em = f = 0.0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        em += max(exact_match(pred, a) for a in ex.answers)
        f += max(f1(pred, a) for a in ex.answers)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f / len(examples)}
