"""`petlkit train / eval / merge` on a real task (scikit-learn digits), and run configs."""

from __future__ import annotations

import json

import pytest
import torch

from petlkit.backbones.vit_weights import load_vit
from petlkit.cli import main
from petlkit.run import load_run
from tests.helpers import run_results

ARGS = ["--backbone", "vit-tiny", "--task", "digits", "--steps", "6", "--batch-size", "16",
        "--eval-every", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *ARGS, "--method", "ssf", "--output", str(out)]) == 0
    return out


def test_train_writes_a_complete_run_folder(trained):
    names = {p.name for p in trained.iterdir()}
    assert {
        "run.json",
        "adapter",
        "results.json",
        "metrics.jsonl",
        "checkpoint.safetensors",
    } <= names
    results = json.loads((trained / "results.json").read_text())
    assert results["steps"] == 6 and results["best_step"] in (3, 6)


def test_eval_reproduces_the_trained_scores(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(trained), "--split", "val", "test"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = json.loads((trained / "results.json").read_text())
    assert scores == {"val": results["val"], "test": results["test"]}


def test_merge_writes_a_backbone_with_the_same_outputs(trained, tmp_path):
    path = tmp_path / "merged.safetensors"
    assert main(["merge", "--run", str(trained), "--output", str(path)]) == 0
    merged = load_vit(path).eval()
    model, _, _ = load_run(trained)
    pixels = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(pixels), model.eval()(pixels), rtol=0, atol=1e-5)


def test_yaml_run_config_with_flags_overriding(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "backbone: vit-tiny\nmethod: lora\nmethod_args: {r: 2}\ntask: digits\n"
        "train: {steps: 2, batch_size: 8, eval_every: 0, lr: 0.01}\n"
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--steps", "3", "--output", str(out)]) == 0
    spec = json.loads((out / "run.json").read_text())
    assert spec["train"]["steps"] == 3 and spec["method_args"] == {"r": 2}
    assert (
        json.loads((out / "results.json").read_text())["trainable_parameters"]
        == 4 * 2 * 192 * 12  # 4·r·d·L (q and v)
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ("backbone: vit-tiny\nmethod: lora\n", "lacks \\['task'\\]"),
        ("backbone: vit-tiny\nmethod: lora\ntask: digits\nlearning: 1\n", "unknown run keys"),
        ("backbone: vit-tiny\nmethod: lora\ntask: digits\ntrain: {stepz: 1}\n", "unknown training"),
        ("!!python/object/apply:os.system ['echo owned']\n", "could not|constructor|mapping"),
    ],
)
def test_bad_run_configs_fail_with_one_line(tmp_path, capsys, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_resume_needs_only_the_output_folder(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    assert main(["train", "--output", str(run), "--resume"]) == 0  # finished: nothing left to do
    assert run_results(run) == run_results(trained)


def test_eval_one_model_on_several_tasks(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--backbone", "vit-tiny", "--task", "shapes-location", "--method", "linear",
            "--steps", "2", "--batch-size", "8", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--task", "shapes-location", "mnist-5k"]) == 2
    assert "does not share the inputs and labels" in capsys.readouterr().err  # 9 vs 10 classes
    assert main(["eval", "--run", str(out), "--task", "shapes-location", "shapes-location"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["shapes-location"] and "accuracy" in table["shapes-location"]["test"]


def test_train_folded_from_the_command_line(tmp_path):
    """--fold on trains SaS folded; the run folder records it."""
    out = tmp_path / "folded"
    assert main(["train", *ARGS, "--method", "sas", "--fold", "on", "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["fold"] == "on"
    assert json.loads((out / "run.json").read_text())["train"]["fold"] == "on"
