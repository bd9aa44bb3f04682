"""Fashion-MNIST (Xiao et al., 2017; MIT) from the IDX files of the Debian package
`dataset-fashion-mnist` (optional: `apt-get install -y dataset-fashion-mnist`, as root)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from petlkit.errors import PetlError

FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dimension sizes, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise PetlError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise PetlError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def load_fashion_mnist(folder: Path = FOLDER) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train', 'test'}: (images (n, 28, 28) uint8, labels (n,) uint8)."""
    if not folder.is_dir():
        raise PetlError(
            f"Fashion-MNIST is optional and not installed ({folder} is missing): as root, "
            "apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    return {
        split: (read_idx(folder / images), read_idx(folder / labels))
        for split, (images, labels) in FILES.items()
    }
