"""Users' own data and folders through the command line, one case each: what is refused exits 2
with one line that names the problem and the fix; accepted conventions train and evaluate."""

from __future__ import annotations

import json
import shutil

import pytest

from petlkit.cli import main
from tests.helpers import TINY, TRAIN, nothing_written, one_line_error

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


def test_one_training_example_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d", train=(0,))
    one_line_error(capsys, _text_train(tmp_path, data), "1 training example", "at least 2")
    assert nothing_written(tmp_path)


def test_a_single_class_is_refused(tmp_path, capsys):
    data = _text_folder(tmp_path / "d", train=(1, 1, 1))
    one_line_error(capsys, _text_train(tmp_path, data), "every training example has label '1'")
    assert nothing_written(tmp_path)


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
    assert nothing_written(tmp_path)


def test_no_space_for_the_checkpoints_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import collections

    import petlkit.run

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(petlkit.run.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    argv = [*TRAIN, *TINY, "--method", "lora", "--output", str(tmp_path / "out")]
    one_line_error(capsys, argv, "0.0 MiB free", "checkpoints need about", "free space")
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


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
