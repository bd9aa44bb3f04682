"""The bad-input list, one case each, through the command line: every case exits 2 with one line
that names the problem and the fix, and never a traceback."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from petlkit.cli import main
from tests.helpers import TINY, TRAIN, nothing_written, one_line_error, train_with


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished LoRA run on digits (2 steps), the base of the checkpoint cases."""
    folder = tmp_path_factory.mktemp("run") / "run"
    argv = [*TRAIN, *TINY, "--method", "lora", "--method-arg", "r=2", "--output", str(folder)]
    assert main(argv) == 0
    return folder


CASES = {
    "unknown backbone": (["--backbone", "vit-huge", "--method", "lora", "--task", "digits"],
                         ["unknown backbone 'vit-huge'", "vit-tiny"]),
    "unknown method": (["--method", "lorra", *TINY], ["unknown method 'lorra'", "lora"]),
    "unknown task": (["--backbone", "vit-tiny", "--method", "lora", "--task", "digitz"],
                     ["unknown task 'digitz'", "mnist-5k"]),
    "targets match nothing": (["--method", "lora", "--method-arg", 'targets=["nowhere"]', *TINY],
                              ["match no", "candidates", "qkv"]),
    "negative rank": (["--method", "lora", "--method-arg", "r=-1", *TINY], ["r", "-1"]),
    "prefix length 0": (["--method", "prefix", "--method-arg", "length=0", *TINY],
                        ["length", "0"]),
    "scale NaN": (["--method", "sas", "--method-arg", "scale=NaN", *TINY], ["scale", "nan"]),
    "rank of the wrong type": (["--method", "lora", "--method-arg", "r=four", *TINY],
                               ["r", "'four'"]),
    "batch larger than the data": (["--method", "lora", *TINY, "--batch-size", "4096"],
                                   ["batch_size 4096 is larger than the 800", "use at most 800"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_train_arguments(name, tmp_path, capsys):
    argv, needles = CASES[name]
    one_line_error(capsys, train_with(tmp_path, *argv), *needles)
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_a_checkpoint_for_another_backbone(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    spec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**spec, "backbone": "vit-small"}))
    one_line_error(capsys, ["eval", "--run", str(run)], "was saved for a", "backbone it was "
                   "trained on")  # fmt: skip


def test_a_checkpoint_for_another_method(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["method"] = {"method": "sas"}
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    one_line_error(capsys, ["eval", "--run", str(run)], "does not match its own config",
                   "belongs to another adapter")  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file(trained_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    one_line_error(capsys, ["eval", "--run", str(run)], "adapter_model.safetensors")


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"format_version": 99}, ["format version 99", "upgrade petlkit"]),
        ({"format_version": None}, ["lacks the key 'format_version'"]),
    ],
)
def test_adapter_config_versions_and_missing_keys(trained_run, tmp_path, capsys, change, needles):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "adapter" / "adapter_config.json"
    config = {**json.loads(path.read_text()), **change}
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(json.dumps(config))
    one_line_error(capsys, ["eval", "--run", str(run)], *needles)


def test_adapter_config_unknown_keys_warn_and_are_ignored(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["method"]["from_the_future"] = 1
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="from_the_future"):
        assert main(["eval", "--run", str(run)]) == 0


def test_run_config_unknown_and_missing_keys(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"backbone": "vit-tiny", "method": "lora", "task": "digits",
                                  "learning_rate": 1}))  # fmt: skip
    one_line_error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "o")],
                   "unknown run keys ['learning_rate']", "valid keys")  # fmt: skip
    config.write_text(json.dumps({"backbone": "vit-tiny", "task": "digits"}))
    one_line_error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "o")],
                   "lacks ['method']", "add them")  # fmt: skip


def _text_files(folder, train_lines: list[str]) -> None:
    folder.mkdir()
    good = [json.dumps({"text": f"sentence {i}", "label": i % 2}) for i in range(8)]
    (folder / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (folder / "val.jsonl").write_text("\n".join(good) + "\n")


@pytest.mark.parametrize(
    "line, needles",
    [
        ('{"txt": "a", "label": 1}', ["train.jsonl", "record 1", "'text' column"]),
        ('{"text": "", "label": 1}', ["train.jsonl", "record 1", "empty"]),
    ],
)
def test_text_files_with_a_missing_column_or_empty_text(tmp_path, capsys, line, needles):
    _text_files(tmp_path / "data", [line])
    argv = [*TRAIN, "--backbone", "minilm-l6", "--method", "lora", "--task", "text-files",
            "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "o")]  # fmt: skip
    one_line_error(capsys, argv, *needles)


def test_an_image_that_does_not_decode(tmp_path, capsys):
    root = tmp_path / "images"
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "broken.png").write_bytes(b"not a png")
    argv = [*TRAIN, "--backbone", "vit-tiny", "--method", "lora", "--task", "image-folder",
            "--data-dir", str(root), "--batch-size", "1",
            "--output", str(tmp_path / "o")]  # fmt: skip
    one_line_error(capsys, argv, "broken.png")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("{not json", ["run.json is not valid JSON"]),
        ("[1, 2]", ["must hold a mapping of run keys"]),
    ],
)
def test_run_config_that_is_not_a_mapping(tmp_path, capsys, content, needles):
    config = tmp_path / "run.json"
    config.write_text(content)
    one_line_error(capsys, ["train", "--config", str(config), "--output", str(tmp_path / "o")],
                   *needles)  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        ("missing", ["no adapter_config.json in", "is it a petlkit adapter folder?"]),
        ("garbled", ["adapter_config.json is not valid JSON"]),
    ],
)
def test_adapter_config_missing_or_garbled(trained_run, tmp_path, capsys, damage, needles):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "adapter" / "adapter_config.json"
    if damage == "missing":
        path.unlink()
    else:
        path.write_text('{"format_version": 1, "meth')
    one_line_error(capsys, ["eval", "--run", str(run)], *needles)


def test_squad_without_its_files(tmp_path, capsys):
    one_line_error(capsys, train_with(tmp_path, "--backbone", "bert-base-shape", "--method",
                                      "lora", "--task", "squad"),
                   "squad reads train-v1.1.json and dev-v1.1.json: pass --data-dir")  # fmt: skip


def test_a_text_backbone_on_an_image_task(tmp_path, capsys):
    one_line_error(capsys, train_with(tmp_path, "--backbone", "minilm-l6", "--method", "lora",
                                      "--task", "digits"),
                   "backbone 'minilm-l6' is text; task 'digits' is vision")  # fmt: skip
    assert nothing_written(tmp_path)


def test_run_folders_that_are_not_runs(tmp_path, capsys):
    one_line_error(capsys, ["train", "--config", str(tmp_path / "absent.yaml"), "--output",
                            str(tmp_path / "o")], "no run config at")  # fmt: skip
    one_line_error(capsys, [*train_with(tmp_path, *TINY, "--method", "lora"), "--resume"],
                   "holds no run (run.json); start without --resume")  # fmt: skip
    one_line_error(capsys, ["eval", "--run", str(tmp_path)], "is not a petlkit run folder",
                   "give `train`'s --output folder")  # fmt: skip


@pytest.mark.parametrize("shard", ["3/3", "one/two", "2"])
def test_a_bad_shard_is_refused_by_the_parser(tmp_path, capsys, shard):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--preset", "quick", "--shard", shard, "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "give I/N with 0 <= I < N, e.g. 0/4" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_dir_help_names_every_file_task(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    # argparse wraps lines after a hyphen ("image-" / "folder"): join them back
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))
    for task in ("text-files", "text-generation", "image-folder", "vtab-<name>", "train800.txt",
                 "fewshot-<name>", "glue-<task>", "squad"):  # fmt: skip
        assert task in text, task
