"""The project ViT reads timm's state-dict layout unchanged and resizes position embeddings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from petlkit import CheckpointError
from petlkit.backbones import load_timm_state_dict, load_vit, vit


def timm_state_dict(dim=64, depth=2, patch=8, grid=4, classes=10, mlp=4) -> dict:
    """Random tensors under timm VisionTransformer's key names and shapes (written out here,
    independently of the project's model, so a naming drift in the model fails the test)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    state = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
        "head.weight": r(classes, dim),
        "head.bias": r(classes),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(mlp * dim, dim), b + "mlp.fc1.bias": r(mlp * dim),
            b + "mlp.fc2.weight": r(dim, mlp * dim), b + "mlp.fc2.bias": r(dim),
        }  # fmt: skip
    return state


def test_timm_state_dict_loads_with_no_missing_or_unexpected_keys():
    state = timm_state_dict()
    model = vit(
        "vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    )
    assert set(model.state_dict()) == set(state)
    load_timm_state_dict(model, state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_wrong_shape_checkpoint_fails_clearly():
    model = vit(
        "vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10
    )
    with pytest.raises(
        CheckpointError, match=r"cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\)"
    ):
        load_timm_state_dict(model, timm_state_dict(dim=64))


def test_load_vit_infers_shape_and_interpolates_position_embeddings(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(timm_state_dict(), str(path))
    same = load_vit(path)
    assert (same.cfg.embed_dim, same.cfg.depth, same.cfg.patch_size, same.cfg.img_size) == (
        64, 2, 8, 32)  # fmt: skip
    bigger = load_vit(path, num_classes=5, img_size=48)
    assert bigger.pos_embed.shape == (1, 1 + 6 * 6, 64)
    assert bigger.head.out_features == 5
    out = bigger(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # the class-token position is carried over untouched
    torch.testing.assert_close(bigger.pos_embed[:, 0], same.pos_embed[:, 0])


def test_pickle_weights_are_refused(tmp_path):
    path = tmp_path / "vit.pth"
    path.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_vit(path)


def test_any_image_and_patch_size():
    model = vit("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=1, num_classes=4)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 4)
