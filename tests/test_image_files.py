"""VTAB-1k and NOAH few-shot readers on fixtures in their public layouts; PIL preprocessing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from petlkit.errors import PetlError
from petlkit.tasks import load_task
from petlkit.tasks.images import IMAGENET_MEAN, IMAGENET_STD, preprocess

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _image(path, colour, size=(10, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_vtab(root, name="caltech101"):
    folder = root / name
    lines = {}
    for split, n in (("train800", 6), ("val200", 3), ("test", 4)):
        rows = []
        for i in range(n):
            label = i % 3
            rel = f"images/{split}_{i}.png"
            _image(folder / rel, COLOURS[label])
            rows.append(f"{rel} {label}")
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_vtab_layout_reads_lazily_and_preprocesses(tmp_path):
    make_vtab(tmp_path)
    task = load_task("vtab-caltech101", tmp_path, resolution=8)
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes == {"train": 6, "val": 3, "test": 4, "train800val200": 9}
    assert task.num_labels == 3 and task.image_size == 8
    pixels = task.splits["test"].inputs.load()
    assert pixels.shape == (4, 3, 8, 8)
    # a pure green image: channel 1 is (1 − mean) / std, the others (0 − mean) / std
    green = pixels[1]
    expected = [
        (c / 255 - m) / s for c, m, s in zip(COLOURS[1], IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    torch.testing.assert_close(green.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)


def test_every_missing_list_file_is_named_in_one_error(tmp_path):
    folder = make_vtab(tmp_path)
    for name in ("train800.txt", "val200.txt"):
        (folder / name).unlink()
    with pytest.raises(PetlError, match=r"lacks train800.txt, val200.txt: a VTAB-1k task folder"):
        load_task("vtab-caltech101", tmp_path)


def test_train800val200_is_read_only_where_present(tmp_path):
    """`petlkit train` never reads the joint list; the retrain rule joins train and val itself."""
    from petlkit.bench.tasks import train_and_val

    folder = make_vtab(tmp_path)
    (folder / "train800val200.txt").unlink()
    task = load_task("vtab-caltech101", tmp_path, resolution=8)
    assert set(task.splits) == {"train", "val", "test"}
    joined = train_and_val(task).splits["train"]
    assert len(joined) == 9 and joined.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert joined.inputs.load().shape == (9, 3, 8, 8)


def test_a_split_file_naming_a_missing_image_fails_before_training(tmp_path):
    folder = make_vtab(tmp_path)
    (folder / "images" / "test_2.png").unlink()
    with pytest.raises(PetlError, match=r"test.txt:3: names images/test_2.png, which is not in"):
        load_task("vtab-caltech101", tmp_path)


def test_an_undecodable_image_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PetlError, match="bad.png is not an image PIL can decode"):
        preprocess(bad, 8)


def test_noah_few_shot_layout(tmp_path):
    folder = tmp_path / "fgvc-aircraft"
    for i in range(4):
        _image(folder / "images" / f"a{i}.jpg", COLOURS[i % 2])
    notes = folder / "annotations"
    notes.mkdir()
    (notes / "train_meta.list.num_shot_2.seed_1").write_text("a0.jpg 0\na1.jpg 1\n")
    (notes / "val_meta.list").write_text("a2.jpg 0\n")
    (notes / "test_meta.list").write_text("a2.jpg 0\na3.jpg 1\n")
    task = load_task("fewshot-fgvc-aircraft", tmp_path, shots=2, seed=1, resolution=4)
    assert task.name == "fewshot-fgvc-aircraft-2shot-seed1"
    assert task.splits["train"].labels.tolist() == [0, 1] and len(task.splits["test"]) == 2
    with pytest.raises(PetlError, match="no split file .*num_shot_4.seed_1"):
        load_task("fewshot-fgvc-aircraft", tmp_path, shots=4, seed=1)


def test_train_on_vtab_files_from_the_cli(tmp_path):
    import json

    from petlkit.cli import main

    make_vtab(tmp_path / "vtab")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "backbone": "vit-tiny", "method": "vpt", "task": "vtab-caltech101",
        "data_dir": str(tmp_path / "vtab"), "image_size": 16, "patch_size": 4,
        "train": {"steps": 2, "batch_size": 3, "eval_every": 0},
    }))  # fmt: skip
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["steps"] == 2


def test_image_folder_layout(tmp_path):
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        for c, colour in zip(("cat", "dog"), COLOURS, strict=False):
            for i in range(per_class):
                _image(tmp_path / "pets" / split / c / f"{i}.png", colour)
    task = load_task("image-folder", tmp_path / "pets", resolution=4)
    assert task.name == "pets" and task.num_labels == 2
    assert task.splits["train"].labels.tolist() == [0, 0, 1, 1]
    assert task.splits["test"].inputs.load().shape == (2, 3, 4, 4)
    _image(tmp_path / "pets" / "val" / "bird" / "0.png", COLOURS[2])
    with pytest.raises(PetlError, match="bird is a class the train folder does not have"):
        load_task("image-folder", tmp_path / "pets")


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("a line without a label", r"train800.txt:2: expected 'path label', got 'images/x.png'"),
        ("a label that is not a number", r"train800.txt:2: expected 'path label'"),
        ("an empty list", r"train800.txt lists no images"),
        ("no task folder", r"no VTAB-1k task folder"),
    ],
)
def test_malformed_vtab_files_are_named(tmp_path, damage, needle):
    folder = make_vtab(tmp_path)
    listing = folder / "train800.txt"
    rows = listing.read_text().splitlines()
    if damage == "a line without a label":
        listing.write_text("\n".join([rows[0], "images/x.png", *rows[2:]]) + "\n")
    elif damage == "a label that is not a number":
        listing.write_text("\n".join([rows[0], "images/train800_1.png cat", *rows[2:]]) + "\n")
    elif damage == "an empty list":
        listing.write_text("\n\n")
    else:
        folder.rename(tmp_path / "elsewhere")
    with pytest.raises(PetlError, match=needle):
        load_task("vtab-caltech101", tmp_path)


def test_image_folder_layout_errors_name_the_fix(tmp_path):
    root = tmp_path / "pets"
    root.mkdir()
    with pytest.raises(PetlError, match=r"pets has no train/ folder; expected .*/train/<class>/"):
        load_task("image-folder", root)
    (root / "train").mkdir()
    with pytest.raises(PetlError, match=r"train has no class folders"):
        load_task("image-folder", root)
    _image(root / "train" / "cat" / "0.png", COLOURS[0])
    _image(root / "train" / "dog" / "0.png", COLOURS[1])
    with pytest.raises(PetlError, match=r"pets has no val/ folder"):
        load_task("image-folder", root)
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(PetlError, match=r"val holds no images \(.*\.png"):
        load_task("image-folder", root)
    _image(root / "val" / "cat" / "0.png", COLOURS[0])
    task = load_task("image-folder", root, resolution=4)  # no test/ folder: allowed
    assert sorted(task.splits) == ["train", "val"]
