"""Human-rated sentiment sentences (Hutto & Gilbert, ICWSM 2014; MIT licence), read from the
source distribution of vaderSentiment 3.3.2 (`additional_resources/hutto_ICWSM_2014.tar.gz`).

Each sentence has the mean of about 20 human ratings on [-4, 4]. Domains: movie-review snippets
(10,605), tweets (4,200), product-review snippets (3,708), NYT editorial snippets (5,190). Tasks use
them as regression (the mean rating) or binary (rating > 0 vs < 0, exact zeros dropped). Repeated
texts are kept once, then fixed splits from seed 0: 20 % test, 10 % validation, the rest train.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tarfile
from pathlib import Path

from petlkit.errors import PetlError

SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAINS = {"movies": "movieReviewSnippets", "tweets": "tweets",
           "products": "amazonReviewSnippets", "editorials": "nytEditorialSnippets"}  # fmt: skip
SPLIT_SEED, TEST_FRACTION, VAL_FRACTION = 0, 0.2, 0.1


def data_dir() -> Path:
    """Where downloaded data files live: $PETLKIT_DATA, else <environment>/petlkit-data."""
    return Path(os.environ.get("PETLKIT_DATA", Path(sys.prefix) / "petlkit-data"))


def sdist_path() -> Path:
    path = data_dir() / SDIST
    if not path.is_file():
        raise PetlError(
            f"the human-rated sentiment sets come from the vaderSentiment source package, not "
            f"found at {path}: pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 "
            f"-d {data_dir()}   (make test and make demo do this)"
        )
    return path


def read_domain(domain: str) -> list[tuple[str, float]]:
    """(text, mean rating) for one domain, each text once."""
    if domain not in DOMAINS:
        raise PetlError(f"unknown sentiment domain {domain!r}; valid: {sorted(DOMAINS)}")
    with tarfile.open(sdist_path()) as outer:
        inner_bytes = outer.extractfile(INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        name = f"hutto_ICWSM_2014/{DOMAINS[domain]}_GroundTruth.txt"
        text = inner.extractfile(name).read().decode("utf-8")
    seen: dict[str, float] = {}
    for line in text.splitlines():
        _, rating, sentence = line.split("\t", 2)
        sentence = sentence.strip()
        if sentence and sentence not in seen:
            seen[sentence] = float(rating)
    return sorted(seen.items())


def split_domain(domain: str) -> dict[str, list[tuple[str, float]]]:
    rows = read_domain(domain)
    random.Random(SPLIT_SEED).shuffle(rows)
    n_test, n_val = int(TEST_FRACTION * len(rows)), int(VAL_FRACTION * len(rows))
    return {"test": rows[:n_test], "val": rows[n_test : n_test + n_val],
            "train": rows[n_test + n_val :]}  # fmt: skip
