"""The project's Vision Transformer. Parameter names equal timm's `VisionTransformer`, so timm
checkpoints load unchanged; extension points are explicit attributes, never patched forwards:

- `Attention.extra_kv`: a callable (x) -> (key, value) tokens, each (batch, heads, p, head_dim),
  prepended to k and v (None from the callable: nothing added), for prefix tuning;
- `VisionTransformer.token_hooks`: callables applied to the token sequence after the position
  embedding (`"embed"`), before each block (`"block.N"`) and before the final norm (`"final"`),
  for prompts. Both hold plain callables, not modules, so a method's parameters stay its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petlkit.layout import BackboneLayout, BlockLayout


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.extra_kv: Callable[[torch.Tensor], tuple | None] | None = None  # see module doc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, heads, n, head_dim)
        extra = None if self.extra_kv is None else self.extra_kv(x)
        if extra is not None:
            k = torch.cat([extra[0].to(k.dtype), k], dim=2)
            v = torch.cat([extra[1].to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT with a class token; `forward_features` / `forward_head` as in timm."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            cfg = ViTConfig(**{**cfg.__dict__, **overrides})
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch {cfg.patch_size}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(
                f"embed_dim {cfg.embed_dim} is not a multiple of {cfg.num_heads} heads"
            )
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.grid**2, d) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.token_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # module doc
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _hook(self, key: str, x: torch.Tensor) -> torch.Tensor:
        hook = self.token_hooks.get(key)
        return x if hook is None else hook(x)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.cls_token.dtype))  # inputs take the model dtype
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self._hook("embed", x)
        for i, block in enumerate(self.blocks):
            x = block(self._hook(f"block.{i}", x))
        return self.norm(self._hook("final", x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, 0])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def petl_layout(self) -> BackboneLayout:
        blocks = tuple(
            BlockLayout(
                attn_in=f"blocks.{i}.attn",
                attn_linears=(f"blocks.{i}.attn.qkv",),
                query=f"blocks.{i}.attn.qkv",
                value=f"blocks.{i}.attn.qkv",
                attn_out=f"blocks.{i}.attn.proj",
                mlp_in=f"blocks.{i}.mlp",
                mlp_linears=(f"blocks.{i}.mlp.fc1",),
                mlp_out=f"blocks.{i}.mlp.fc2",
                attention=f"blocks.{i}.attn",
                block=f"blocks.{i}",
            )
            for i in range(self.cfg.depth)
        )
        fused = frozenset(b.query for b in blocks)
        return BackboneLayout(self.cfg.embed_dim, self.cfg.num_heads, blocks, fused)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def vit(preset: str = "vit_tiny", **overrides) -> VisionTransformer:
    """A randomly initialised ViT of a named shape; any field of ViTConfig can be overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; valid: {sorted(PRESETS)}")
    return VisionTransformer(ViTConfig(**{**PRESETS[preset], **overrides}))
