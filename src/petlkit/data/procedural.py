"""Procedurally generated structured image tasks, deterministic from a seed (the here-scale
stand-ins for VTAB's structured group: dSprites location/orientation, CLEVR counting).

All images are 28×28 grey, values in [0, 1], one bright object (or several) on a dark, slightly
noisy background:
- `location`: a filled square of random size; label = its centre's cell in a 3×3 grid (9 classes);
- `orientation`: a bar through a random point; label = its angle in 8 bins over 180° (8 classes);
- `count`: 1 to 6 non-overlapping small squares; label = count − 1 (6 classes).
"""

from __future__ import annotations

import math

import numpy as np

SIZE = 28
KINDS = {"location": 9, "orientation": 8, "count": 6}


def _background(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 0.15, (SIZE, SIZE)).astype(np.float32)


def _location(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    image = _background(rng)
    side = int(rng.integers(4, 8))
    top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
    image[top : top + side, left : left + side] = rng.uniform(0.7, 1.0)
    cy, cx = top + side / 2, left + side / 2
    return image, int(cy * 3 // SIZE) * 3 + int(cx * 3 // SIZE)


def _orientation(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    image = _background(rng)
    label = int(rng.integers(0, 8))
    angle = (label + rng.uniform(0.1, 0.9)) * math.pi / 8  # inside its bin, clear of the edges
    cy, cx = rng.uniform(10, 18, 2)
    for t in np.linspace(-9, 9, 80):
        y, x = int(round(cy + t * math.sin(angle))), int(round(cx + t * math.cos(angle)))
        if 0 <= y < SIZE and 0 <= x < SIZE:
            image[y, x] = 1.0
    return image, label


def _count(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    image = _background(rng)
    count = int(rng.integers(1, 7))
    cells = rng.choice(16, size=count, replace=False)  # a 4×4 grid of 7-pixel cells: no overlap
    for cell in cells:
        top, left = (
            7 * (cell // 4) + int(rng.integers(0, 3)),
            7 * (cell % 4) + int(rng.integers(0, 3)),
        )
        image[top : top + 4, left : left + 4] = rng.uniform(0.7, 1.0)
    return image, count - 1


MAKERS = {"location": _location, "orientation": _orientation, "count": _count}


def generate(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) float32 in [0, 1], labels (n,) int64), the same for the same seed."""
    rng = np.random.default_rng(seed)
    pairs = [MAKERS[kind](rng) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)
