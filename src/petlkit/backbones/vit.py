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
from torch import nn
from torch.utils.checkpoint import checkpoint

from petlkit.backbones.vit_layers import AttentionPool, Block, PatchEmbed, layer_norm
from petlkit.layout import BackboneLayout, BlockLayout


@dataclass(frozen=True)
class ViTConfig:
    """The shape and layout of a ViT. Layout switches follow timm's `VisionTransformer`:
    class_token / reg_tokens (register tokens, DINOv2-reg), no_embed_class (position embeddings
    for patches only), pre_norm (CLIP's `norm_pre`; patch embedding then has no bias unless
    patch_bias says so), act ('gelu' or CLIP's 'quick_gelu'), init_values (LayerScale),
    qk_norm, global_pool ('token', 'avg' or 'map', the attention-pool head) and fc_norm (a norm
    after pooling instead of before; None: on for 'avg', as timm)."""

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
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    patch_bias: bool | None = None
    act: str = "gelu"
    init_values: float | None = None
    qk_norm: bool = False
    global_pool: str = "token"
    fc_norm: bool | None = None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm


PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}
POOLS = ("token", "avg", "map")


class VisionTransformer(nn.Module):
    """Pre-norm ViT (timm's layouts); `forward_features` / `forward_head` as in timm."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            cfg = ViTConfig(**{**cfg.__dict__, **overrides})
        _check(cfg)
        self.cfg = cfg
        d, eps = cfg.embed_dim, cfg.norm_eps
        bias = (not cfg.pre_norm) if cfg.patch_bias is None else cfg.patch_bias
        self.patch_embed = PatchEmbed(cfg.in_chans, d, cfg.patch_size, bias)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d))
        positions = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, positions, d) * 0.02)
        self.norm_pre = layer_norm(d, eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.Identity() if cfg.use_fc_norm else layer_norm(d, eps)
        self.attn_pool = AttentionPool(cfg) if cfg.global_pool == "map" else None
        self.fc_norm = layer_norm(d, eps) if cfg.use_fc_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.token_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # module doc
        self.grad_checkpointing = False
        self.apply(_init_weights)
        if cfg.class_token:
            nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens in front of the patches (prompts go after them)."""
        return self.cfg.num_prefix_tokens

    def _hook(self, key: str, x: torch.Tensor) -> torch.Tensor:
        hook = self.token_hooks.get(key)
        return x if hook is None else hook(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.cfg.no_embed_class:
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.pos_embed.dtype  # inputs take the model's dtype
        x = self.norm_pre(self._pos_embed(self.patch_embed(pixels.to(dtype))))
        x = self._hook("embed", x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = self._hook(f"block.{i}", x)
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm(self._hook("final", x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:
            pooled = self.attn_pool(tokens)
        elif self.cfg.global_pool == "avg":
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            pooled = tokens[:, 0]
        return self.head(self.fc_norm(pooled))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (less memory,
        about one more forward of time)."""
        self.grad_checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

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


def _check(cfg: ViTConfig) -> None:
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch {cfg.patch_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not a multiple of {cfg.num_heads} heads")
    if cfg.global_pool not in POOLS:
        raise ValueError(f"global_pool {cfg.global_pool!r} is not one of {list(POOLS)}")
    if cfg.global_pool == "token" and not cfg.class_token:
        raise ValueError("global_pool 'token' needs the class token; use 'avg' or 'map'")


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
