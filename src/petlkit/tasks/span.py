"""Extractive question answering (SQuAD 1.1): windows of (question, context) tokens with the
answer's start and end token, and the decoding of predicted spans back to context text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task
from petlkit.tasks.squad import SquadExample, read_squad

MAX_ANSWER_TOKENS = 30


@dataclass(frozen=True)
class SpanFeatures(Sequence):
    """Tokenised windows: model inputs, which example each came from, and the character offsets
    of its context tokens (None for question and special tokens)."""

    tensors: dict[str, torch.Tensor]
    example: tuple[int, ...]
    offsets: tuple[tuple[tuple[int, int] | None, ...], ...]

    def __len__(self) -> int:
        return len(self.example)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def take(self, index: Sequence[int]) -> SpanFeatures:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return SpanFeatures(
            {k: v[idx] for k, v in self.tensors.items()},
            tuple(self.example[i] for i in idx.tolist()),
            tuple(self.offsets[i] for i in idx.tolist()),
        )


def encode_examples(
    examples: list[SquadExample], tokenizer, max_length: int = 384, stride: int = 128
) -> Split:
    """Windows over each context (overlapping by `stride` tokens); labels (start, end) token of
    the first answer, or (0, 0) (the [CLS] token) when a window does not contain it."""
    if not getattr(tokenizer, "is_fast", False):
        raise PetlError("question answering needs a fast tokenizer (character offsets)")
    enc = tokenizer(
        [e.question for e in examples], [e.context for e in examples], truncation="only_second",
        max_length=max_length, stride=stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length", return_tensors="pt",
    )  # fmt: skip
    sources = enc.pop("overflow_to_sample_mapping").tolist()
    mappings = enc.pop("offset_mapping").tolist()
    labels, offsets = [], []
    for i, source in enumerate(sources):
        sequence = enc.sequence_ids(i)
        context = tuple(
            tuple(m) if s == 1 else None for m, s in zip(mappings[i], sequence, strict=True)
        )
        offsets.append(context)
        ex = examples[source]
        start_char = ex.starts[0]
        end_char = start_char + len(ex.answers[0])
        start = end = 0
        for t, span in enumerate(context):
            if span is None:
                continue
            if span[0] <= start_char < span[1] and start == 0:
                start = t
            if span[0] < end_char <= span[1]:
                end = t
        if not (start and end and end >= start):
            start = end = 0
        labels.append((start, end))
    features = SpanFeatures(dict(enc), tuple(sources), tuple(offsets))
    return Split(features, torch.tensor(labels, dtype=torch.long))


def best_answers(
    logits: torch.Tensor, features: SpanFeatures, examples: list[SquadExample], n_best: int = 20
) -> dict[str, str]:
    """The highest-scoring valid span (inside the context, end ≥ start, at most 30 tokens) per
    example across its windows, as context text."""
    best: dict[int, tuple[float, str]] = {}
    for i, source in enumerate(features.example):
        start_logits, end_logits = logits[i, :, 0], logits[i, :, 1]
        offsets = features.offsets[i]
        starts = start_logits.topk(min(n_best, len(offsets))).indices.tolist()
        ends = end_logits.topk(min(n_best, len(offsets))).indices.tolist()
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s >= MAX_ANSWER_TOKENS:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if source not in best or score > best[source][0]:
                    context = examples[source].context
                    best[source] = (score, context[offsets[s][0] : offsets[e][1]])
    return {ex.id: best.get(j, (0.0, ""))[1] for j, ex in enumerate(examples)}


def squad_task(folder, tokenizer, max_length: int = 384, stride: int = 128, held_out: int = 1000):
    """SQuAD 1.1 from `folder/train-v1.1.json` and `folder/dev-v1.1.json`: `held_out` training
    questions are the validation split, the official dev set the test split."""
    from pathlib import Path

    folder = Path(folder)
    train = read_squad(folder / "train-v1.1.json")
    test = read_squad(folder / "dev-v1.1.json")
    if len(train) <= held_out:
        raise PetlError(f"{folder}/train-v1.1.json has {len(train)} questions; {held_out} are held "
                        "out for validation, so it needs more")  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    parts = {"train": [train[i] for i in order[held_out:]],
             "val": [train[i] for i in order[:held_out]], "test": test}  # fmt: skip
    splits = {k: encode_examples(v, tokenizer, max_length, stride) for k, v in parts.items()}
    return Task("squad", "span", 2, splits, metric="squad", examples=parts)
