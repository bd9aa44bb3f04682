"""LoRA (Hu et al., 2022): W x + (α/r)·B A x on chosen linears; mergeable.

On a fused q|k|v projection (the ViT's `attn.qkv`) each chosen part (q, k, v) gets its own
pair, exactly as LoRA on separate q and v linears would. Gated (UniPELT): W x + G(x)·B A x with
one gate per adapted projection, computed from that projection's input x (UniPELT's
`LoRA_Linear(add_gate=True)`); on a fused q|k|v each part has its own gate. The gate replaces α/r
and blocks merging.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from petlkit.config import (
    MethodConfig,
    check_bool,
    check_choice,
    check_finite,
    check_positive_int,
    check_probability,
    check_range,
)
from petlkit.errors import ConfigError, NotMergeableError, TargetError
from petlkit.layout import layout_of
from petlkit.methods.base import Method, Tuner, innermost
from petlkit.methods.folding import fold_refusal
from petlkit.methods.gate import Gate
from petlkit.methods.placement import follow
from petlkit.methods.targeting import find_targets
from petlkit.registry import register_method

QKV = ("q", "k", "v")


class LoRALinear(Tuner):
    """`parts` selects slices of a fused output (None: the whole output is one part)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        owner: str,
        r: int,
        scaling: float,
        dropout: float,
        parts: Sequence[int] | None = None,
        num_chunks: int = 1,
        gated: bool = False,
    ) -> None:
        super().__init__(base_layer, owner)
        base_layer = innermost(base_layer)
        if not isinstance(base_layer, nn.Linear):
            raise TargetError(f"LoRA adapts nn.Linear layers, got {type(base_layer).__name__}")
        self.parts = list(parts) if parts is not None else None
        n_parts = 1 if parts is None else len(parts)
        out_part = base_layer.out_features // num_chunks
        self.num_chunks = num_chunks
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n_parts * r, base_layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n_parts, out_part, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = Gate(base_layer.in_features, n_parts) if gated else None

    def up_matrix(self) -> torch.Tensor:
        """Every part's up-projection in one (out_features, n_parts·r) matrix: part p's B sits in
        its chunk's rows (q, k or v) and its own rank columns, zeros elsewhere. Formed once per
        forward from the parameters (out·n·r numbers), so the update is two matmuls per token,
        with no index tensors and no scatter into the fused output."""
        n, out_part, r = self.lora_B.shape
        if self.parts is None:
            return self.lora_B[0]
        rows = []
        for chunk in range(self.num_chunks):
            if chunk in self.parts:
                i = self.parts.index(chunk)
                rows.append(F.pad(self.lora_B[i], (i * r, (n - 1 - i) * r)))
            else:
                rows.append(self.lora_B.new_zeros(out_part, n * r))
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.folded:
            return self.forward_folded(x)
        out = self.base_layer(x)
        if not self.enabled:
            return out
        h = F.linear(self.dropout(x), follow(self.lora_A, x))  # (..., n_parts·r)
        if self.gate is None:
            h = h * self.scaling
        else:  # one gate per adapted projection, (batch, n_parts), on that part's rank block
            g = self.gate(x)
            shape = (g.shape[0], *([1] * (h.dim() - 2)), g.shape[1], 1)
            h = (h.unflatten(-1, (g.shape[1], self.r)) * g.view(shape)).flatten(-2)
        up = follow(self.up_matrix(), h)
        # out + h·Bᵀ in one GEMM that reads `out` as its addend (no separate pass over it)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.t())
        return flat.view(out.shape)

    def delta(self) -> tuple[torch.Tensor, None]:
        if self.gate is not None:
            raise NotMergeableError("gated LoRA cannot merge: its gate depends on the input")
        return (self.up_matrix() @ self.lora_A) * self.scaling, None

    def fold_refusal(self) -> str | None:
        if self.gate is not None:
            return "gated LoRA's gate G(x) depends on the input"
        if not isinstance(self.dropout, nn.Identity):
            return "LoRA dropout acts on the input, not on a weight (set dropout=0)"
        return fold_refusal(self.base_layer)


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """r: rank; alpha: scaling numerator (update scaled by alpha / r); targets: None for the
    backbone's query and value projections, else exact suffixes or a full-match regex;
    qkv_parts: which parts of a fused q|k|v projection get a LoRA pair; gated: multiply each
    projection's update by its own UniPELT gate G(x) instead of alpha / r."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | Sequence[str] | None = None
    qkv_parts: Sequence[str] = ("q", "v")
    gated: bool = False

    def validate(self) -> None:
        check_positive_int("LoRAConfig", "r", self.r)
        check_finite("LoRAConfig", "alpha", self.alpha, positive=True)
        check_range("LoRAConfig", "alpha", self.alpha, 0, 1e4)
        check_probability("LoRAConfig", "dropout", self.dropout)
        if not self.qkv_parts:
            raise ConfigError("LoRAConfig.qkv_parts must name at least one of q, k, v")
        for part in self.qkv_parts:
            check_choice("LoRAConfig", "qkv_parts", part, QKV)
        check_bool("LoRAConfig", "gated", self.gated)


@register_method("lora")
class LoRA(Method):
    config_cls = LoRAConfig
    default_lr = 3e-3
    merge_refusal = None

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        fused = frozenset()
        if cfg.gated:
            self.merge_refusal = (
                "gated LoRA cannot merge: its gate G(x) depends on the input; train with "
                "gated=False to get a mergeable LoRA"
            )
        if cfg.targets is None:
            layout = layout_of(model)
            names = list(dict.fromkeys(n for b in layout.blocks for n in (b.query, b.value)))
            fused = layout.fused_qkv
        else:
            names = find_targets(model, cfg.targets)
            if hasattr(model, "petl_layout"):
                fused = layout_of(model).fused_qkv
        parts = sorted(QKV.index(p) for p in set(cfg.qkv_parts))
        for name in names:
            is_fused = name in fused
            self.wrap(
                model,
                name,
                lambda base, f=is_fused: LoRALinear(
                    base,
                    self.name,
                    cfg.r,
                    1.0 if cfg.gated else cfg.alpha / cfg.r,
                    cfg.dropout,
                    parts=parts if f else None,
                    num_chunks=3 if f else 1,
                    gated=cfg.gated,
                ),
            )
