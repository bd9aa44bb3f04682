"""Loading timm-format ViT checkpoints (safetensors only) into the project's ViT."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from petlkit.backbones.vit import VisionTransformer, ViTConfig
from petlkit.errors import CheckpointError
from petlkit.io import read_safetensors, write_safetensors


def infer_config(
    state: dict[str, torch.Tensor],
    img_size: int | None = None,
    num_heads: int | None = None,
    act: str = "gelu",
) -> ViTConfig:
    """The ViT that a timm state dict describes: shape and layout (class/register tokens,
    position embeddings with or without them, norm_pre, patch bias, LayerScale, qk-norm, pooling
    and fc_norm). What weights cannot tell comes as arguments: the head count (else width // 64,
    timm's convention for tiny/small/base) and the activation ('quick_gelu' for CLIP)."""
    try:
        proj = state["patch_embed.proj.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        pos = state["pos_embed"]
        fc1 = state["blocks.0.mlp.fc1.weight"]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"not a timm ViT state dict: missing {err}") from err
    dim, chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    class_token = "cls_token" in state
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(class_token) + reg_tokens
    positions = pos.shape[1]
    no_embed_class = prefix > 0 and _is_square(positions) and not _is_square(positions - prefix)
    grid = round((positions if no_embed_class else positions - prefix) ** 0.5)
    head = state.get("head.weight")
    pool = "avg" if "fc_norm.weight" in state else "token"
    if "attn_pool.latent" in state:
        pool = "map"
    return ViTConfig(
        img_size=img_size or grid * patch,
        patch_size=patch,
        in_chans=chans,
        num_classes=0 if head is None else head.shape[0],
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or max(1, dim // 64),
        mlp_ratio=fc1.shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        class_token=class_token,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        pre_norm="norm_pre.weight" in state,
        patch_bias="patch_embed.proj.bias" in state,
        act=act,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,  # γ itself is loaded
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        global_pool=pool,
        fc_norm="fc_norm.weight" in state,
    )


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n


def resize_pos_embed(pos: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """timm's resampling: the prefix tokens' embeddings kept, the patch grid resized bicubically
    with antialiasing (PIL's cubic kernel), computed in float32."""
    prefix, grid_tokens = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    old = int(round(grid_tokens.shape[1] ** 0.5))
    if old == new_grid:
        return pos
    grid = grid_tokens.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def load_timm_state_dict(
    model: VisionTransformer, state: dict[str, torch.Tensor], load_head: bool = True
) -> None:
    """Load timm-named weights; interpolates pos_embed to the model's image size.

    With `load_head=False` (a new task) the checkpoint's head is skipped.
    """
    state = dict(state)
    if "pos_embed" in state:
        prefix = 0 if model.cfg.no_embed_class else model.cfg.num_prefix_tokens
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.cfg.grid, prefix)
    if not load_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            "checkpoint shapes do not fit this ViT (build the model with the checkpoint's shape, "
            "e.g. petlkit.backbones.load_vit(path)): " + "; ".join(wrong[:5])
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not load_head:
        missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match the ViT: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}; is it a timm VisionTransformer state dict?"
        )


def load_vit(
    path: str | Path, num_classes: int | None = None, img_size: int | None = None
) -> VisionTransformer:
    """A ViT shaped like the checkpoint at `path`, its weights loaded; a new head if
    `num_classes` differs from the checkpoint's."""
    state = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    heads = meta.get("num_heads")
    cfg = infer_config(state, img_size, int(heads) if heads else None, meta.get("act", "gelu"))
    if "norm_eps" in meta:  # CLIP's LayerNorms use 1e-5, timm's ViTs 1e-6 (the default)
        cfg = ViTConfig(**{**cfg.__dict__, "norm_eps": float(meta["norm_eps"])})
    keep_head = num_classes is None or num_classes == cfg.num_classes
    if not keep_head:
        cfg = ViTConfig(**{**cfg.__dict__, "num_classes": num_classes})
    model = VisionTransformer(cfg)
    load_timm_state_dict(model, state, load_head=keep_head)
    return model


def save_vit(
    model: VisionTransformer,
    path: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write a timm-format checkpoint (atomically) that `load_vit` reads back exactly; the head
    count goes in the metadata, since shapes alone do not fix it. `state` replaces the model's
    own state dict (e.g. cast to float16); `extra` adds metadata strings."""
    metadata = {"format": "pt", "num_heads": str(model.cfg.num_heads), "act": model.cfg.act,
                "norm_eps": str(model.cfg.norm_eps), **(extra or {})}  # fmt: skip
    write_safetensors(path, model.state_dict() if state is None else state, metadata)


def from_timm(model: torch.nn.Module) -> VisionTransformer:
    """A timm `VisionTransformer` (pretrained or not) as the project ViT, with the same weights
    and outputs. The layout comes from its state dict (`infer_config`); what weights cannot show
    (head count, QuickGELU, the norms' eps, the image size) from its modules."""
    try:
        block, patch_embed = model.blocks[0], model.patch_embed
        heads, eps = block.attn.num_heads, block.norm1.eps
    except AttributeError as err:
        raise CheckpointError(f"{type(model).__name__} is not a timm VisionTransformer") from err
    act = "quick_gelu" if type(block.mlp.act).__name__ == "QuickGELU" else "gelu"
    size = patch_embed.img_size
    size = size[0] if isinstance(size, tuple | list) else size
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cfg = infer_config(state, size, heads, act)
    ours = VisionTransformer(ViTConfig(**{**cfg.__dict__, "norm_eps": eps}))
    load_timm_state_dict(ours, state)
    return ours.train(model.training)
