"""Distribution shifts of an image task, generated from a seed: the here-scale analogue of
ImageNet → -V2, -Sketch, -A, -R (a model trained on the source is scored unchanged on each).

Images are (N, C, H, W) in [-1, 1] (the normalisation of every in-memory image task), with the
background at -1 as in MNIST; every shift keeps that range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHIFTS = ("rotate", "invert", "noise", "blur", "sketch")
ANGLES = (25.0, 50.0)  # degrees: a magnitude drawn per image in this range, either sign
NOISE_STD = 0.5  # Gaussian noise, in units of the [-1, 1] range
BLUR_SIGMA = 1.2  # pixels at 28 px; scaled with the image side


def shift_images(images: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """`images` under the shift `kind` (one of SHIFTS), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "rotate":
        return _rotate(images, gen)
    if kind == "invert":
        return -images
    if kind == "noise":
        noise = torch.randn(images.shape, generator=gen) * NOISE_STD
        return (images + noise).clamp(-1.0, 1.0)
    if kind == "blur":
        return _blur(images, BLUR_SIGMA * images.shape[-1] / 28)
    if kind == "sketch":
        return _edges(images)
    raise ValueError(f"unknown shift {kind!r}; valid shifts: {list(SHIFTS)}")


def _rotate(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    low, high = ANGLES
    magnitude = low + torch.rand(len(images), generator=gen) * (high - low)
    sign = torch.randint(0, 2, (len(images),), generator=gen) * 2 - 1
    angles = torch.deg2rad(magnitude * sign)
    cos, sin = angles.cos(), angles.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    lifted = images + 1.0  # the background (-1) becomes 0, the padding value
    return F.grid_sample(lifted, grid, align_corners=False, padding_mode="zeros") - 1.0


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, scaled per image to [-1, 1]: outlines instead of strokes."""
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3).repeat(channels, 1, 1, 1), groups=channels)
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3).repeat(channels, 1, 1, 1), groups=channels)
    magnitude = (gx**2 + gy**2).sqrt()
    peak = magnitude.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return magnitude / peak * 2.0 - 1.0
