"""Real weights, real data: runs for minutes, so marked slow (`make test-slow`)."""

from __future__ import annotations

import pytest

import petlkit
from petlkit.data.rotten_tomatoes import load_rotten_tomatoes
from petlkit.train.text import TextTrainConfig, evaluate_text, train_text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sas"])
def test_method_on_minilm_beats_the_majority_class_on_rotten_tomatoes(method):
    data = load_rotten_tomatoes()
    test = data["test"].head(1000)
    majority = max(sum(test.labels), len(test) - sum(test.labels)) / len(test)
    built = petlkit.build_model("minilm-l6", num_classes=2, pooling="mean")
    model = petlkit.attach(built.model, method)
    train_text(model, built.tokenizer, data["train"], TextTrainConfig(steps=150, lr=3e-3),
               progress=False)  # fmt: skip
    accuracy = evaluate_text(model, built.tokenizer, test)
    assert accuracy >= majority + 0.10, (accuracy, majority)


@pytest.mark.slow
def test_trainer_runs_lora_on_minilm_above_the_majority_class(tmp_path):
    """The full path a user takes: `petlkit train` (the Accelerate trainer), then its results."""
    from petlkit.run import RunSpec, train_run

    spec = RunSpec(
        backbone="minilm-l6", method="lora", task="rotten-tomatoes",
        train={"steps": 150, "lr": 3e-3, "eval_every": 75, "max_length": 64},
    )  # fmt: skip
    results = train_run(spec, tmp_path, progress=False)
    labels = load_rotten_tomatoes()["test"].labels
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert results["test"]["accuracy"] >= majority + 0.10, (results["test"], majority)
