"""Here-scale vision tasks: real MNIST-5k, and generated structured tasks whose labels are what
the images show."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from petlkit.data.procedural import generate
from petlkit.errors import PetlError
from petlkit.tasks import load_task


def test_mnist_5k_is_vtab_1k_style():
    task = load_task("mnist-5k")
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 800, "val": 200, "test": 4000}
    assert task.splits["test"].inputs.shape[1:] == (1, 28, 28) and task.num_labels == 10
    assert task.splits["train"].inputs.min() >= -1.0 and task.splits["train"].inputs.max() <= 1.0


@pytest.mark.parametrize("kind", ["location", "orientation", "count"])
def test_generation_is_deterministic_from_the_seed(kind):
    a, la = generate(kind, 20, seed=3)
    b, lb = generate(kind, 20, seed=3)
    c, _ = generate(kind, 20, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)


def _bright(image):
    return image > 0.5


def test_location_labels_are_the_grid_cell_of_the_square():
    images, labels = generate("location", 200, seed=0)
    for image, label in zip(images, labels, strict=True):
        ys, xs = np.nonzero(_bright(image))
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        assert int(cy * 3 // 28) * 3 + int(cx * 3 // 28) == label


def test_count_labels_are_the_number_of_squares():
    images, labels = generate("count", 200, seed=0)
    for image, label in zip(images, labels, strict=True):
        assert ndimage.label(_bright(image))[1] == label + 1


def test_orientation_labels_are_the_bar_angle_bin():
    images, labels = generate("orientation", 200, seed=0)
    right = 0
    for image, label in zip(images, labels, strict=True):
        ys, xs = np.nonzero(_bright(image))
        cov = np.cov(np.stack([xs, ys]).astype(float))
        vx, vy = np.linalg.eigh(cov)[1][:, -1]
        angle = np.arctan2(vy, vx) % np.pi
        right += int(angle // (np.pi / 8)) % 8 == label
    assert right >= 190  # a rasterised bar's fitted angle can fall just across a bin edge


def test_k_shot_sampler_takes_k_per_class_reproducibly():
    train = load_task("shapes-count").splits["train"]
    a, b = train.k_shot(4, seed=1), train.k_shot(4, seed=1)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs, b.inputs)
    assert a.labels.bincount().tolist() == [4] * 6
    with pytest.raises(PetlError, match="fewer than k=500"):
        train.k_shot(500)


def _idx(path, array):
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_on_a_fixture(tmp_path):
    from petlkit.data.fashion_mnist import FILES, load_fashion_mnist

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        images, labels = FILES[split]
        _idx(tmp_path / images, rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / labels, np.arange(n) % 10)
    data = load_fashion_mnist(tmp_path)
    assert data["train"][0].shape == (5, 28, 28) and data["test"][1].tolist() == [0, 1, 2]
    truncated = tmp_path / FILES["test"][0]
    _idx(truncated, rng.integers(0, 256, (3, 28, 28)))
    import gzip

    with gzip.open(truncated) as f:
        raw = f.read()[:-10]
    with gzip.open(truncated, "wb") as f:
        f.write(raw)
    with pytest.raises(PetlError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_names_the_optional_package(tmp_path):
    from petlkit.data.fashion_mnist import load_fashion_mnist

    with pytest.raises(PetlError, match="optional.*apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")


@pytest.mark.parametrize("kind", ["rotate", "invert", "noise", "blur", "sketch"])
def test_a_shifted_task_is_the_same_task_under_a_seeded_shift(kind):
    """`<task>:<shift>` keeps labels and range, changes every image set, and is reproducible."""
    from petlkit.data.shifts import shift_images

    base, shifted = load_task("shapes-count"), load_task(f"shapes-count:{kind}")
    assert shifted.name == f"shapes-count:{kind}" and shifted.num_labels == base.num_labels
    for name, split in base.splits.items():
        moved = shifted.splits[name]
        assert torch.equal(moved.labels, split.labels)
        assert moved.inputs.shape == split.inputs.shape
        assert moved.inputs.min() >= -1.0 and moved.inputs.max() <= 1.0
        assert (moved.inputs - split.inputs).abs().mean() > 0.05  # a real shift
    again = load_task(f"shapes-count:{kind}").splits["test"].inputs
    assert torch.equal(again, shifted.splits["test"].inputs)
    if kind in ("rotate", "noise"):  # drawn from the seed
        images = base.splits["test"].inputs[:8]
        assert not torch.equal(shift_images(images, kind, 0), shift_images(images, kind, 1))


def test_shift_names_are_checked():
    with pytest.raises(PetlError, match="unknown shift 'tilt'.*rotate"):
        load_task("digits:tilt")
    with pytest.raises(PetlError, match="shifts apply to image tasks"):
        load_task("rotten-tomatoes:blur")


def _blank(n: int = 1, side: int = 28) -> torch.Tensor:
    return -torch.ones(n, 1, side, side)  # MNIST's background, in [-1, 1]


def _axis_angle(image: torch.Tensor) -> float:
    """The principal axis of the ink (values above the background), in degrees."""
    ink = (image[0] + 1.0).clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    total = ink.sum()
    mx, my = (ink * xs).sum() / total, (ink * ys).sum() / total
    cxx = (ink * (xs - mx) ** 2).sum() / total
    cyy = (ink * (ys - my) ** 2).sum() / total
    cxy = (ink * (xs - mx) * (ys - my)).sum() / total
    return math.degrees(0.5 * math.atan2(2 * cxy, cxx - cyy))


def test_the_shifts_have_the_documented_magnitudes():
    """The README's targets: rotation by 25–50° either way, Gaussian noise of σ = 0.5, blur of
    σ = 1.2 px at 28 px."""
    from petlkit.data.shifts import shift_images

    bars = _blank(64)
    bars[:, :, 13:15, 4:24] = 1.0  # a horizontal bar
    signed = [_axis_angle(img) for img in shift_images(bars, "rotate", seed=3)]
    angles = [abs(a) for a in signed]
    assert min(angles) > 24.0 and max(angles) < 51.0 and max(angles) - min(angles) > 15.0
    assert min(signed) < 0 < max(signed)  # both ways
    grey = torch.zeros(1, 1, 28, 28)  # mid-range: the ±1 clamp cuts only beyond 2σ
    noise = shift_images(grey, "noise", seed=0)
    assert 0.43 < noise.std().item() < 0.5
    dot = _blank()
    dot[0, 0, 14, 14] = 1.0
    spread = shift_images(dot, "blur")[0, 0] + 1.0  # the kernel, scaled by the dot's height 2
    xs = torch.arange(28.0)
    weights = spread.sum(0) / spread.sum()
    variance = (weights * (xs - 14.0) ** 2).sum().item()
    assert variance == pytest.approx(1.2**2, rel=0.05)
