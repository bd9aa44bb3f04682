"""The bad-input list, one case each, through the command line: every case exits 2 with one line
that names the problem and the fix, and never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from petlkit.cli import main

TRAIN = ["train", "--steps", "2", "--batch-size", "8"]
TINY = ["--backbone", "vit-tiny", "--task", "digits"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished LoRA run on digits (2 steps), the base of the checkpoint cases."""
    folder = tmp_path_factory.mktemp("run") / "run"
    argv = [*TRAIN, *TINY, "--method", "lora", "--method-arg", "r=2", "--output", str(folder)]
    assert main(argv) == 0
    return folder


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    output = capsys.readouterr().err
    assert "Traceback" not in output, output
    errors = [line for line in output.replace("\r", "\n").splitlines() if "petlkit:" in line]
    assert len(errors) == 1 and errors[0].startswith("petlkit: error: "), output  # progress aside
    err = errors[0]
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def train_with(tmp_path, *extra: str) -> list[str]:
    return [*TRAIN, *extra, "--output", str(tmp_path / "out")]


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


# -- users' own data and folders (one case each; accepted conventions train and evaluate) -------
TEXT = ["--backbone", "minilm-l6", "--method", "linear", "--task", "text-files"]
WORDS = ["good", "bad", "fine", "awful", "great", "poor"]


def _rows(labels, key="label"):
    return [{"text": f"{WORDS[i % 6]} {WORDS[(i + 1) % 6]}", key: v} for i, v in enumerate(labels)]


def _jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _text_folder(root, train=(0, 1, 0, 1), val_name="val", key="label"):
    held_out = sorted(set(train))[:2] * (2 if len(set(train)) == 1 else 1)
    _jsonl(root / "train.jsonl", _rows(train, key))
    _jsonl(root / f"{val_name}.jsonl", _rows(held_out, key))
    _jsonl(root / "test.jsonl", _rows(held_out[::-1], key))
    return root


def _text_train(tmp_path, data, *extra) -> list[str]:
    return ["train", *TEXT, "--data-dir", str(data), "--steps", "1", "--batch-size", "1",
            "--eval-every", "0", *extra, "--output", str(tmp_path / "out")]  # fmt: skip


def _nothing_written(tmp_path) -> bool:
    out = tmp_path / "out"
    return not out.exists() or not any(p.name != "." for p in out.iterdir())


def test_one_training_example_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d", train=(0,))
    one_line_error(capsys, _text_train(tmp_path, data), "1 training example", "at least 2")
    assert _nothing_written(tmp_path)


def test_a_single_class_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d", train=(1, 1, 1))
    one_line_error(capsys, _text_train(tmp_path, data), "every training example has label '1'")
    assert _nothing_written(tmp_path)


def test_an_empty_val_file_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d")
    (data / "val.jsonl").write_text("")
    one_line_error(capsys, _text_train(tmp_path, data), "val.jsonl holds no records")


def test_a_latin1_csv_is_refused_then_read_with_encoding(tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "val", "test"):
        text = "text,label\ncafé crème,0\nbon marché,1\nà la carte,0\nnaïve,1\n"
        (data / f"{split}.csv").write_bytes(text.encode("latin-1"))
    one_line_error(capsys, _text_train(tmp_path, data), "not utf-8 text", "--encoding latin-1")
    assert main(_text_train(tmp_path, data, "--encoding", "latin-1")) == 0


def test_a_score_that_is_not_a_number_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d", key="score")
    _jsonl(data / "train.jsonl", [*_rows([0.5, 1.5], "score"), {"text": "x", "score": "good"}])
    one_line_error(capsys, _text_train(tmp_path, data), "record 3 has score 'good', not a number")


def test_score_files_train_a_regression(tmp_path):
    """A `score` column (no `label`) is learnt as regression and scored by correlation."""
    data = tmp_path / "d"
    for split in ("train", "val", "test"):
        _jsonl(data / f"{split}.jsonl", _rows([0.5, -1.0, 2.0, 0.0], "score"))
    assert main(_text_train(tmp_path, data)) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["test"]) == {"pearson", "spearman"}


@pytest.mark.parametrize(
    ("damage", "extra", "needles"),
    [
        ("a line that is not JSON", [], ["train.jsonl:2: not a JSON object"]),
        ("a JSON line that is not an object", [], ["train.jsonl:2: not a JSON object"]),
        ("", ["--encoding", "klingon"], ["unknown encoding 'klingon'", "Python codec name"]),
    ],
)
def test_malformed_text_files_and_options_are_named(tmp_path, capsys, damage, extra, needles):
    data = _text_folder(tmp_path / "d")
    lines = (data / "train.jsonl").read_text().splitlines()
    if damage == "a line that is not JSON":
        lines[1] = '{"text": "cut off'
    elif damage:
        lines[1] = '["good film", 1]'
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    one_line_error(capsys, _text_train(tmp_path, data, *extra), *needles)


def test_both_label_and_score_need_a_target(tmp_path, capsys):
    data = tmp_path / "d"
    for split in ("train", "val", "test"):
        rows = [dict(r, score=float(r["label"]) * 2) for r in _rows([0, 1, 0, 1])]
        _jsonl(data / f"{split}.jsonl", rows)
    one_line_error(capsys, _text_train(tmp_path, data), "both 'label' and 'score'", "--target")
    assert main(_text_train(tmp_path, data, "--target", "label")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["test"]) == {"macro_f1", "accuracy"}  # protocols.md: domain tasks


@pytest.mark.parametrize("val_name", ["validation", "dev"])
def test_validation_and_dev_file_names_are_accepted(tmp_path, val_name):
    data = _text_folder(tmp_path / "d", val_name=val_name)
    assert main(_text_train(tmp_path, data)) == 0
    assert main(["eval", "--run", str(tmp_path / "out")]) == 0


def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.csv").write_text("\ufefftext,label\ngood one,1\nbad one,0\nok,1\n")
    assert main(_text_train(tmp_path, data)) == 0


def test_output_naming_a_file_or_a_path_under_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    one_line_error(capsys, [*TRAIN, *TINY, "--method", "lora", "--output", str(target)],
                   "is a file, not a folder")  # fmt: skip
    one_line_error(capsys, [*TRAIN, *TINY, "--method", "lora", "--output", str(target / "run")],
                   "lies under", "which is a file")  # fmt: skip
    assert target.read_text() == "mine"


def test_an_unwritable_output_folder_is_refused_before_training(capsys):
    # even root cannot create folders under /sys
    one_line_error(capsys, [*TRAIN, *TINY, "--method", "lora", "--output", "/sys/petlkit-run"],
                   "cannot write to /sys/petlkit-run")  # fmt: skip


def test_a_folder_that_becomes_unwritable_mid_run_stops_with_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    import errno
    import os

    import petlkit.io

    real_replace, calls = os.replace, [0]

    def replace(src, dst):  # the second checkpoint write finds the disk read-only
        if str(dst).endswith("checkpoint.safetensors"):
            calls[0] += 1
            if calls[0] >= 2:
                raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(petlkit.io.os, "replace", replace)
    out = tmp_path / "out"
    argv = ["train", "--steps", "4", "--batch-size", "8", "--eval-every", "0",
            "--checkpoint-every", "2", *TINY, "--method", "lora", "--output", str(out)]  # fmt: skip
    one_line_error(capsys, argv, "could not write", "checkpoint.safetensors", "kept")
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["petlkit_training_state"])["info"]["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _grey_pngs(root, size=25):
    from PIL import Image

    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                shade = 40 if label == "a" else 200
                Image.new("L", (size, size), shade + i).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("backbone", ["vit-fmnist", "vit-tiny"])
def test_grey_25px_png_folders_train_on_a_grey_and_an_rgb_vit(tmp_path, backbone):
    data = _grey_pngs(tmp_path / "imgs")
    out = tmp_path / "out"
    argv = ["train", "--backbone", backbone, "--method", "lora", "--task", "image-folder",
            "--data-dir", str(data), "--steps", "2", "--batch-size", "4", "--eval-every", "0",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(["eval", "--run", str(out)]) == 0


def test_a_peft_lora_with_trained_biases_is_refused_not_truncated(tmp_path):
    import petlkit
    from petlkit.interop.peft import export_peft_lora, import_peft_lora
    from tests.conftest import minilm_case

    case = minilm_case()
    export_peft_lora(petlkit.attach(case.make(), "lora"), tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["bias"] == "none"
    import_peft_lora(case.make(), tmp_path / "lora")  # bias "none": imports
    for bias in ("all", "lora_only"):
        (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(dict(config, bias=bias)))
        with pytest.raises(petlkit.CheckpointError, match=f"PEFT bias='{bias}'"):
            import_peft_lora(case.make(), tmp_path / "lora")


def test_an_image_folder_with_a_single_class_is_refused(tmp_path, capsys):
    data = _grey_pngs(tmp_path / "imgs")
    for split in ("train", "val", "test"):
        shutil.rmtree(data / split / "b")
    argv = ["train", "--backbone", "vit-tiny", "--method", "lora", "--task", "image-folder",
            "--data-dir", str(data), "--steps", "1", "--batch-size", "2",
            "--output", str(tmp_path / "out")]  # fmt: skip
    one_line_error(capsys, argv, "every training example has label 'a'", "at least 2 classes")
    assert _nothing_written(tmp_path)


def test_no_space_for_the_checkpoints_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import collections

    import petlkit.run

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(petlkit.run.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    argv = [*TRAIN, *TINY, "--method", "lora", "--output", str(tmp_path / "out")]
    one_line_error(capsys, argv, "0.0 MiB free", "checkpoints need about", "free space")
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


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
    assert _nothing_written(tmp_path)


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


def test_evaluating_on_files_with_other_labels_is_refused(tmp_path, capsys):
    """Class 0 and 1 would mean other labels: scoring would be silently wrong."""
    data = tmp_path / "d"
    for split in ("train", "val", "test"):
        _jsonl(data / f"{split}.jsonl", [{"text": f"w{i}", "label": ("neg", "pos")[i % 2]}
                                         for i in range(4)])  # fmt: skip
    assert main(_text_train(tmp_path, data)) == 0
    other = tmp_path / "other"
    for split in ("train", "val", "test"):
        _jsonl(other / f"{split}.jsonl", [{"text": f"w{i}", "label": ("bad", "good")[i % 2]}
                                          for i in range(4)])  # fmt: skip
    one_line_error(capsys, ["eval", "--run", str(tmp_path / "out"), "--data-dir", str(other)],
                   "labels ['bad', 'good'] are not the ones", "['neg', 'pos']",
                   "evaluate on the same label set")  # fmt: skip
    assert main(["eval", "--run", str(tmp_path / "out")]) == 0  # its own files still score
