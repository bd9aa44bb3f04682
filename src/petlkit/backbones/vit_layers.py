"""The layers of the project ViT, with timm's parameter names (so timm checkpoints load as they
are): patch embedding, attention (optional q/k LayerNorm), MLP (GELU or CLIP's QuickGELU),
LayerScale, the pre-norm block, and the attention-pool (MAP) head of SigLIP-style models."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's activation: x·σ(1.702·x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; `extra_kv` (a callable, see vit.py) prepends key/value tokens."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if qk_norm:
            self.q_norm = layer_norm(self.head_dim, eps)
            self.k_norm = layer_norm(self.head_dim, eps)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim)
        self.extra_kv: Callable[[torch.Tensor], tuple | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, heads, n, head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        extra = None if self.extra_kv is None else self.extra_kv(x)
        if extra is not None:
            q, k, v = prefixed(q, k, v, extra[0].to(k.dtype), extra[1].to(v.dtype))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def prefixed(q, k, v, key_prefix, value_prefix) -> tuple[torch.Tensor, ...]:
    """(q, [key_prefix | k], [value_prefix | v]) along the tokens, all (batch, heads, ·, dim)."""
    if torch.compiler.is_compiling():  # the compiler plans the buffers itself
        return q, torch.cat([key_prefix, k], dim=2), torch.cat([value_prefix, v], dim=2)
    return _Prefixed.apply(q, k, v, key_prefix, value_prefix)


class _Prefixed(torch.autograd.Function):
    """The prefixed keys and values and the queries as views of one buffer, written by one cat.
    q, k and v are views of the fused q|k|v projection's output, which attention would keep
    whole through q alone, beside new tensors for the prefixed keys and values; with q copied
    into the same buffer nothing keeps that output: attention keeps 3n + 2p tokens where it kept
    3n + 2(n + p) (issue #47: prefix tuning's and UniPELT's peak memory), one kernel where it
    took two. The gradients come back as views (the slices the two cats' backward gave)."""

    @staticmethod
    def forward(ctx, q, k, v, key_prefix, value_prefix):  # noqa: D102 (torch's interface)
        p, n = key_prefix.shape[2], k.shape[2]
        ctx.prefix, ctx.shared = p, key_prefix.shape[0] != q.shape[0]  # one for every example
        if ctx.shared:
            key_prefix = key_prefix.expand(q.shape[0], *key_prefix.shape[1:])
            value_prefix = value_prefix.expand(q.shape[0], *value_prefix.shape[1:])
        # token-major (batch, tokens, heads, dim) memory, as the fused output's views have: the
        # attention output then comes in that layout too, and going back to (batch, tokens,
        # width) is a view (with head-major memory CPU's attention writes its output head-major)
        parts = [t.transpose(1, 2) for t in (key_prefix, k, value_prefix, v, q)]
        joined = torch.cat(parts, dim=1).transpose(1, 2)
        keys, values, queries = joined.split([p + n, p + n, q.shape[2]], dim=2)
        return queries, keys, values

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):  # noqa: D102
        p = ctx.prefix
        grad_kp, grad_vp = grad_k[:, :, :p], grad_v[:, :, :p]
        if ctx.shared:
            grad_kp, grad_vp = grad_kp.sum(0, keepdim=True), grad_vp.sum(0, keepdim=True)
        return grad_q, grad_k[:, :, p:], grad_v[:, :, p:], grad_kp, grad_vp


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """x·γ per channel (CaiT, DINOv2): `ls1` / `ls2` in timm."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.norm_eps
        self.norm1 = layer_norm(dim, eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, eps)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act)
        scaled = cfg.init_values is not None
        self.ls1 = LayerScale(dim, cfg.init_values) if scaled else nn.Identity()
        self.ls2 = LayerScale(dim, cfg.init_values) if scaled else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPool(nn.Module):
    """The MAP head (timm's AttentionPoolLatent): one learned query attends over all tokens,
    then a residual MLP; the pooled vector feeds the task head."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = layer_norm(dim, cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads, hd = self.num_heads, d // self.num_heads
        # one query for the batch (then expanded): as timm's, and the same whether or not the
        # weights require grad (matmul on an expanded input picks its kernel by that)
        q = self.q(self.latent).expand(b, -1, -1).reshape(b, 1, heads, hd).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
