"""Here-scale text tasks from installed package files, and domain tasks from the user's files."""

from __future__ import annotations

import json

import pytest
import torch

from petlkit.errors import PetlError
from petlkit.tasks import load_task


@pytest.mark.parametrize("domain", ["movies", "tweets", "products"])
def test_human_rated_domains_as_binary_and_regression(domain):
    binary = load_task(f"sentiment-{domain}-binary")
    score = load_task(f"sentiment-{domain}-score")
    assert binary.num_labels == 2 and score.num_labels == 1 and score.metric == "correlation"
    texts = {k: set(v.inputs) for k, v in score.splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    ratings = score.splits["train"].labels
    assert ratings.dtype == torch.float32 and -4 <= ratings.min() < 0 < ratings.max() <= 4
    n = sum(len(s) for s in score.splits.values())
    assert len(score.splits["test"]) == int(0.2 * n)
    assert set(binary.splits["train"].labels.tolist()) == {0, 1}
    for name, rated in score.splits.items():  # binary: the sign of ratings with |r| >= 0.5
        kept = [
            (t, int(r > 0))
            for t, r in zip(rated.inputs, rated.labels.tolist(), strict=True)
            if abs(r) >= 0.5
        ]
        assert list(binary.splits[name].inputs) == [t for t, _ in kept]
        assert binary.splits[name].labels.tolist() == [y for _, y in kept]
        assert len(kept) < len(rated)  # near-neutral sentences exist and are dropped


def test_missing_vader_sdist_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PETLKIT_DATA", str(tmp_path))
    with pytest.raises(PetlError, match="pip download --no-deps --no-binary :all: vaderSentiment"):
        load_task("sentiment-tweets-binary")


def _write(folder, name, rows, kind="jsonl"):
    folder.mkdir(exist_ok=True)
    if kind == "jsonl":
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")


def test_domain_files_jsonl_and_csv(tmp_path):
    folder = tmp_path / "reviews"
    _write(folder, "train", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    _write(folder, "dev", [{"text": "fine", "label": "pos"}], kind="csv")
    _write(folder, "test", [{"text": "awful", "label": "neg"}])
    task = load_task("text-files", folder)
    assert task.name == "reviews" and task.num_labels == 2
    assert task.splits["train"].labels.tolist() == [1, 0]  # classes sorted: neg 0, pos 1
    assert task.splits["val"].inputs == ["fine"]


def test_domain_file_problems_are_named(tmp_path):
    folder = tmp_path / "d"
    _write(folder, "train", [{"text": "good", "label": "pos"}])
    _write(folder, "val", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(PetlError, match="label 'neutral', which the train file never uses"):
        load_task("text-files", folder)
    _write(folder, "val", [{"sentence": "meh", "label": "pos"}])
    with pytest.raises(PetlError, match="has no 'text' column"):
        load_task("text-files", folder)
    _write(folder, "val", [{"text": "  ", "label": "pos"}])
    with pytest.raises(PetlError, match="record 1 has an empty text"):
        load_task("text-files", folder)
    with pytest.raises(PetlError, match="nowhere has no train file; expected train.jsonl"):
        load_task("text-files", tmp_path / "nowhere")


def test_an_unknown_target_is_refused_by_the_api(tmp_path):
    folder = tmp_path / "d"
    _write(folder, "train", [{"text": "good", "label": "pos"}])
    _write(folder, "val", [{"text": "fine", "label": "pos"}])
    with pytest.raises(PetlError, match=r"unknown target 'stars'; use one of \['label', 'score'\]"):
        load_task("text-files", folder, target="stars")
