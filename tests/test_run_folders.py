"""An adapter and a run folder say exactly what they hold: the task model, the labels, the run's
settings; nothing is overwritten or reused silently."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import petlkit
from petlkit.backbones import build_model
from petlkit.checkpoint import read_adapter_config
from petlkit.cli import _print_results, main
from petlkit.tasks.text_files import text_files_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer

ARGS = ["--backbone", "vit-tiny", "--task", "digits", "--steps", "4", "--batch-size", "16",
        "--eval-every", "2", "--checkpoint-every", "2"]  # fmt: skip
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "fun", "dull"]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _text_data(folder, labels) -> None:
    """A tiny text task: each label has a few distinct two-word texts, in every split."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = [
            {"text": f"{WORDS[i % 10]} {WORDS[(i + k) % 10]} {split}", "label": label}
            for i, label in enumerate(labels)
            for k in range(2)
        ]
        _write_jsonl(folder / f"{split}.jsonl", rows)


# -- the adapter records its task model -------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    _text_data(root / "data", ["pos", "neg", "pos", "neg"])
    out = root / "run"
    args = ["train", "--backbone", "minilm-l6", "--method", "lora", "--task", "text-files",
            "--data-dir", str(root / "data"), "--steps", "3", "--batch-size", "4",
            "--eval-every", "0", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    return root, out


def test_a_cli_trained_text_adapter_predicts_in_python_as_petlkit_eval(text_run, capsys):
    root, out = text_run
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    cli = json.loads(capsys.readouterr().out)["test"]
    config = read_adapter_config(out / "adapter")
    assert config["task_model"]["pooling"] == "mean"  # what `petlkit train` used
    assert config["task_model"]["labels"] == ["neg", "pos"]
    task = text_files_task(root / "data")
    built = build_model("minilm-l6", 2, pooling=config["task_model"]["pooling"])
    petl = petlkit.load_adapter(built.model, out / "adapter").eval()
    texts = list(task.splits["test"].inputs)
    inputs = built.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = petl(**inputs).argmax(-1)
    assert task.score(predictions, task.splits["test"].labels) == cli


def test_loading_into_a_model_with_other_pooling_is_refused(text_run):
    _, out = text_run
    built = build_model("minilm-l6", 2)  # cls pooling: the trap a silent load fell into
    with pytest.raises(petlkit.CheckpointError, match="pooling='mean'.*build it with pooling"):
        petlkit.load_adapter(built.model, out / "adapter")


# -- labels -----------------------------------------------------------------------------------
def test_numeric_labels_sort_numerically_and_survive_save_and_load(tmp_path):
    _text_data(tmp_path / "data", list(range(12)))
    task = text_files_task(tmp_path / "data")
    assert task.label_names == tuple(str(i) for i in range(12))
    assert task.splits["train"].labels[10 * 2] == 10  # label 10 is class 10, not class 2
    petl = petlkit.attach(petlkit.build_model("vit-tiny", 12, img_size=8, patch_size=4).model,
                          "linear")  # fmt: skip
    petlkit.save_adapter(petl, tmp_path / "adapter", labels=task.label_names)
    saved = read_adapter_config(tmp_path / "adapter")["task_model"]["labels"]
    assert saved == [str(i) for i in range(12)]


def test_labels_written_as_floats_or_ints_are_one_class(tmp_path):
    _text_data(tmp_path / "data", [0, 1, 0, 1])
    rows = [{"text": "good thing", "label": 1.0}, {"text": "bad thing", "label": "0"}]
    _write_jsonl(tmp_path / "data" / "val.jsonl", rows)
    task = text_files_task(tmp_path / "data")
    assert task.label_names == ("0", "1")
    assert task.splits["val"].labels.tolist() == [1, 0]


def test_string_labels_map_to_sorted_ids(tmp_path):
    _text_data(tmp_path / "data", ["positive", "negative", "neutral", "positive"])
    task = text_files_task(tmp_path / "data")
    assert task.label_names == ("negative", "neutral", "positive")
    assert task.splits["train"].labels[:2].tolist() == [2, 2]


@pytest.mark.parametrize("bad", [None, ""])
def test_a_missing_label_is_refused_naming_the_record(tmp_path, bad):
    _text_data(tmp_path / "data", [0, 1])
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": bad}]
    _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(petlkit.PetlError, match="train.jsonl: record 3 has no label"):
        text_files_task(tmp_path / "data")


def test_an_empty_class_folder_is_refused(tmp_path):
    from petlkit.tasks.images import image_folder_task

    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(petlkit.PetlError, match="dog holds no images"):
        image_folder_task(tmp_path)


# -- run folders ------------------------------------------------------------------------------
def _steps(out) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_into_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--method", "lora", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", *ARGS, "--method", "sas", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run already (lora on digits" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["train", *ARGS, "--method", "sas", "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["method"] == "sas"
    assert _steps(out) == [1, 2, 3, 4]  # the old run's lines are gone, not appended to


@pytest.mark.parametrize(
    ("change", "named"), [(["--method", "sas"], "method"), (["--lr", "0.5"], "train")]
)
def test_resume_with_changed_settings_is_refused_before_anything_is_written(
    tmp_path, capsys, change, named
):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--method", "lora", "--output", str(out)]) == 0
    saved = (out / "run.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", *change]) == 2
    err = capsys.readouterr().err
    assert f"differ from its run.json: {named}" in err
    assert (out / "run.json").read_bytes() == saved
    assert main(["train", "--output", str(out), "--resume"]) == 0  # a plain resume still works


def test_run_json_keeps_an_absolute_data_path_and_eval_takes_another(tmp_path, monkeypatch):
    _text_data(tmp_path / "data", ["pos", "neg"])
    monkeypatch.chdir(tmp_path)
    args = ["train", "--backbone", "minilm-l6", "--method", "linear", "--task",
            "text-files", "--data-dir", "data", "--steps", "2", "--batch-size", "4",
            "--eval-every", "0", "--output", "run"]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["data_dir"]
    assert saved == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["eval", "--run", str(tmp_path / "run")]) == 2
    assert main(["eval", "--run", str(tmp_path / "run"), "--data-dir", "../moved"]) == 0


def test_files_get_the_users_umask(tmp_path):
    from petlkit.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


# -- API traps --------------------------------------------------------------------------------
def test_disable_after_merge_gives_the_backbone_and_merges_back(vit_case):
    petl = petlkit.attach(vit_case.make(), "lora")
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        adapted = petl(**vit_case.inputs)
        petl.merge()
        reference = vit_case.make()
        reference.head.load_state_dict(petl.model.head.state_dict())
        with petl.disable():
            torch.testing.assert_close(petl(**vit_case.inputs), reference(**vit_case.inputs))
        assert petl.methods["default"].merged
        torch.testing.assert_close(petl(**vit_case.inputs), adapted, rtol=0, atol=1e-5)


def test_attaching_twice_to_one_model_is_refused(vit_case):
    model = vit_case.make()
    petl = petlkit.attach(model, "lora")
    with pytest.raises(petlkit.PetlError, match="already has petlkit methods attached"):
        petlkit.attach(model, "lora")  # a notebook cell run twice
    with pytest.raises(petlkit.PetlError, match=r"remove_method\('default'\)"):
        petlkit.attach(petl, "sas")


def test_an_unknown_method_argument_is_one_line_listing_the_valid_ones(tmp_path, capsys):
    code = main(["train", *ARGS, "--method", "lora", "--method-arg", "rank=4",
                 "--output", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "lora has no argument 'rank'; valid arguments: ['alpha', 'dropout', 'gated'" in err
    assert not (tmp_path / "run").exists()


# -- defaults, processes, progress --------------------------------------------------------------
def test_without_a_learning_rate_the_method_default_is_used(vit_case):
    from petlkit.tasks import load_task

    petl = petlkit.attach(petlkit.build_model("vit-tiny", 10, img_size=8, patch_size=2,
                                              in_chans=1).model, "sas")  # fmt: skip
    trainer = Trainer(petl, load_task("digits"), TrainConfig(steps=1, batch_size=8), progress=False)
    assert trainer.lr == petl.methods["default"].default_lr == 1e-2
    assert trainer.fit()["lr"] == 1e-2


def test_only_the_first_process_prints_results(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    _print_results({"a": 1})
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    _print_results({"a": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def test_eval_shows_progress(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--method", "linear", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    assert "eval test" in capsys.readouterr().err


def test_merge_records_the_task_model_and_refuses_a_vit_path_without_suffix(text_run, tmp_path):
    _, out = text_run
    assert main(["merge", "--run", str(out), "--output", str(tmp_path / "merged")]) == 0
    info = json.loads((tmp_path / "merged" / "petlkit_task_model.json").read_text())
    assert info["pooling"] == "mean" and info["labels"] == ["neg", "pos"]
    vit_run = tmp_path / "vit"
    assert main(["train", *ARGS, "--method", "lora", "--output", str(vit_run)]) == 0
    assert main(["merge", "--run", str(vit_run), "--output", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
