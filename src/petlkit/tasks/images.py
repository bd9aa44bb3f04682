"""Image tasks read from files: VTAB-1k's public file lists, NOAH's few-shot split files, and
image folders. Images load lazily (a split holds paths) with ImageNet-style preprocessing in PIL:
RGB, bicubic resize to the square resolution, scale to [0, 1], normalise by the ImageNet mean/std.
For a one-channel backbone (the project's `vit-fmnist`) images are read as grey and normalised to
[-1, 1], as the project's in-memory grey tasks are (`Task.with_images` picks the backbone's size
and channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VTAB_SPLITS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
# Read where present; the retrain rule (the bench's vtab1k preset) otherwise joins train and val.
VTAB_OPTIONAL = {"train800val200": "train800val200.txt"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def preprocess(path: Path, resolution: int, channels: int = 3) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as image:
            pixels = image.convert(mode).resize((resolution, resolution), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as err:
        raise PetlError(
            f"{path} is not an image PIL can decode ({err}); remove or replace it"
        ) from err
    array = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)
    if channels == 1:
        return ((array - 0.5) / 0.5).unsqueeze(0)
    array = array.permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (array - mean) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass(frozen=True)
class ImageFiles(Sequence):
    """Image paths, loaded and preprocessed when a batch needs them."""

    paths: tuple[Path, ...]
    resolution: int
    channels: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.resolution, self.channels)
        return preprocess(self.paths[index], self.resolution, self.channels)

    def take(self, index: Sequence[int]) -> ImageFiles:
        return ImageFiles(tuple(self.paths[i] for i in index), self.resolution, self.channels)

    def load(self) -> torch.Tensor:
        return torch.stack([preprocess(p, self.resolution, self.channels) for p in self.paths])


def read_file_list(list_file: Path, image_root: Path, resolution: int) -> Split:
    """Lines `relative/path label`; every image must exist (checked up front, not mid-run)."""
    if not list_file.is_file():
        raise PetlError(f"no split file at {list_file}")
    paths, labels = [], []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise PetlError(f"{list_file}:{line_no}: expected 'path label', got {line!r}")
        path = image_root / parts[0]
        if not path.is_file():
            raise PetlError(
                f"{list_file}:{line_no}: names {parts[0]}, which is not in {image_root}"
            )
        paths.append(path)
        labels.append(int(parts[1]))
    if not paths:
        raise PetlError(f"{list_file} lists no images")
    return Split(ImageFiles(tuple(paths), resolution), torch.tensor(labels))


def _num_labels(splits: dict[str, Split]) -> int:
    return int(max(int(s.labels.max()) for s in splits.values())) + 1


def vtab_task(root: str | Path, name: str, resolution: int = 224) -> Task:
    """VTAB-1k task `name` in the public layout: `<root>/<name>/` with train800.txt, val200.txt
    and test.txt (and, read where present, train800val200.txt) listing `image label` relative
    to that folder. Every missing list file is named in one error."""
    folder = Path(root) / name
    if not folder.is_dir():
        raise PetlError(f"no VTAB-1k task folder {folder}")
    missing = [f for f in VTAB_SPLITS.values() if not (folder / f).is_file()]
    if missing:
        raise PetlError(
            f"{folder} lacks {', '.join(missing)}: a VTAB-1k task folder holds train800.txt, "
            "val200.txt and test.txt (lines 'relative/image/path label')"
        )
    files = {**VTAB_SPLITS, **{k: f for k, f in VTAB_OPTIONAL.items() if (folder / f).is_file()}}
    splits = {k: read_file_list(folder / f, folder, resolution) for k, f in files.items()}
    return Task(f"vtab-{name}", "vision", _num_labels(splits), splits, image_size=resolution)


def fewshot_task(root: str | Path, name: str, shots: int, seed: int, resolution: int = 224) -> Task:
    """NOAH's few-shot layout: `<root>/<name>/annotations/train_meta.list.num_shot_<K>.seed_<S>`,
    `val_meta.list` and `test_meta.list`, image paths relative to `<root>/<name>/images`."""
    folder = Path(root) / name
    notes, images = folder / "annotations", folder / "images"
    files = {"train": f"train_meta.list.num_shot_{shots}.seed_{seed}", "val": "val_meta.list",
             "test": "test_meta.list"}  # fmt: skip
    splits = {k: read_file_list(notes / f, images, resolution) for k, f in files.items()}
    return Task(f"fewshot-{name}-{shots}shot-seed{seed}", "vision", _num_labels(splits), splits,
                image_size=resolution)  # fmt: skip


def image_folder_task(root: str | Path, resolution: int = 224) -> Task:
    """`<root>/{train,val,test}/<class name>/<image>`: classes are the train folder's
    subfolders, sorted; val (or `dev`) and test may only use those classes."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise PetlError(f"{root} has no train/ folder; expected {root}/train/<class>/<image>")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise PetlError(f"{train_dir} has no class folders")
    for name in classes:  # an empty folder would be a class no example can teach
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (train_dir / name).iterdir()):
            raise PetlError(f"{train_dir / name} holds no images; add some or remove the folder")
    splits = {}
    for split, names in (("train", ("train",)), ("val", ("val", "dev")), ("test", ("test",))):
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            if split == "test":
                continue
            raise PetlError(f"{root} has no {names[0]}/ folder")
        paths, labels = [], []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise PetlError(f"{class_dir} is a class the train folder does not have "
                                f"(classes: {classes})")  # fmt: skip
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [classes.index(class_dir.name)] * len(files)
        if not paths:
            raise PetlError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits[split] = Split(ImageFiles(tuple(paths), resolution), torch.tensor(labels))
    return Task(root.name, "vision", len(classes), splits, image_size=resolution,
                label_names=tuple(classes))  # fmt: skip
