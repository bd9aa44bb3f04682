"""Real weights, real data: runs for minutes, so marked slow (`make test-slow`)."""

from __future__ import annotations

import pytest

from petlkit.data.rotten_tomatoes import load_rotten_tomatoes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sas"])
def test_trainer_runs_a_method_on_minilm_above_the_majority_class(tmp_path, method):
    """The full path a user takes: `petlkit train` (the Accelerate trainer), then its results."""
    from petlkit.run import RunSpec, train_run

    spec = RunSpec(
        backbone="minilm-l6", method=method, task="rotten-tomatoes",
        train={"steps": 150, "lr": 3e-3, "eval_every": 75, "max_length": 64},
    )  # fmt: skip
    results = train_run(spec, tmp_path, progress=False)
    labels = load_rotten_tomatoes()["test"].labels
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert results["test"]["accuracy"] >= majority + 0.10, (results["test"], majority)
