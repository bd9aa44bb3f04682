"""LoRA (Hu et al., 2022): W x + (α/r)·B A x on chosen linears; mergeable.

On a fused q|k|v projection (the ViT's `attn.qkv`, GPT-2's `c_attn`, Phi-3's `qkv_proj`,
GPT-NeoX's per-head interleaved `query_key_value`) each chosen part (q, k, v) gets its own pair,
exactly as LoRA on separate q and v linears would; where the parts differ in size (grouped-query
attention) their up-projections are stored one after the other, (rows of all parts, r).
Gated (UniPELT): W x + G(x)·B A x with one gate per adapted projection, computed from that
projection's input x (UniPELT's `LoRA_Linear(add_gate=True)`); on a fused q|k|v each part has its
own gate. The gate replaces α/r and blocks merging.
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
from petlkit.layout import layout_of, layout_or_none
from petlkit.methods.base import Method, Tuner, innermost
from petlkit.methods.folding import fold_refusal
from petlkit.methods.gate import Gate
from petlkit.methods.linears import LINEARS, as_weight, in_out, plain_linear
from petlkit.methods.lora_update import GatedLoRAUpdate, LinearLoRAUp, LoRAUp, LoRAUpdate
from petlkit.methods.placement import (
    compute_input,
    follow,
    share_input_cast,
    unshare_input_cast,
)
from petlkit.methods.targeting import find_targets
from petlkit.registry import register_method

QKV = ("q", "k", "v")


Segment = tuple[int, int, int]  # (part: 0 q, 1 k, 2 v; first row within the part; rows)


def qkv_segments(layout) -> list[Segment]:
    """How a fused projection's output rows split into q, k and v, in output order."""
    d, heads, kv = layout.dim_per_head, layout.num_heads, layout.key_value_heads
    if layout.qkv_split == "heads":  # GPT-NeoX: per head, its q, k, v
        return [(part, h * d, d) for h in range(heads) for part in range(3)]
    return [(0, 0, heads * d), (1, 0, kv * d), (2, 0, kv * d)]


class _PartsUp(torch.autograd.Function):
    """The parts' up-projections in one zero matrix (rows of q|k|v, n·r): part i's B (`up[i]`,
    or its rows of a 2-D `up`) at its output rows and its own rank columns. One fill and one
    copy forward (a copy per part where the parts are not evenly spaced or of one size), one
    stack (or cat) of the blocks backward: autograd's pads, selects and cat launch a
    zero-filled copy per part each way."""

    @staticmethod
    def forward(ctx, up, blocks, rows: int, r: int):  # noqa: D102 (torch's interface)
        ctx.blocks, ctx.r, ctx.stacked = blocks, r, up.dim() == 3
        matrix = up.new_zeros(rows, len(blocks) * r)
        width, starts = len(blocks) * r, [start for start, _, _, _ in blocks]
        steps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
        if ctx.stacked and up.is_contiguous() and len(steps) == 1 and min(steps) > 0:
            step = steps.pop() * width + r  # part i + 1 starts this many elements after part i
            matrix.as_strided(up.shape, (step, width, 1), starts[0] * width).copy_(up)
            return matrix
        for i, (start, end, first, last) in enumerate(blocks):
            part = up[i] if ctx.stacked else up[first:last]
            matrix[start:end, i * r : (i + 1) * r] = part
        return matrix

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        r = ctx.r
        pieces = [grad[start:end, i * r : (i + 1) * r]
                  for i, (start, end, _, _) in enumerate(ctx.blocks)]  # fmt: skip
        return (torch.stack(pieces) if ctx.stacked else torch.cat(pieces)), None, None, None


class LoRALinear(Tuner):
    """`parts` selects parts of a fused output laid out as `segments` (None: the whole output
    is one part)."""

    def __init__(
        self,
        base_layer: nn.Module,
        owner: str,
        r: int,
        scaling: float,
        dropout: float,
        parts: Sequence[int] | None = None,
        segments: Sequence[Segment] = (),
        gated: bool = False,
        causal: bool = False,
    ) -> None:
        super().__init__(base_layer, owner)
        base_layer = innermost(base_layer)
        if not isinstance(base_layer, LINEARS):
            raise TargetError(
                f"LoRA adapts nn.Linear (and transformers' Conv1D) layers, got "
                f"{type(base_layer).__name__}"
            )
        in_features, out_features = in_out(base_layer)
        self.parts = list(parts) if parts is not None else None
        self.segments = list(segments)
        n_parts = 1 if parts is None else len(parts)
        sizes = [out_features] if parts is None else [self._part_rows(p) for p in self.parts]
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n_parts * r, in_features))
        if len(set(sizes)) == 1:
            self.lora_B = nn.Parameter(torch.zeros(n_parts, sizes[0], r))
        else:  # parts of different sizes (GQA): one after the other
            self.lora_B = nn.Parameter(torch.zeros(sum(sizes), r))
        self._offsets = [sum(sizes[:i]) for i in range(n_parts + 1)]
        self.register_buffer("_row_order", self._output_order(), persistent=False)
        self._spacing = self._parts_spacing()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = Gate(in_features, n_parts, causal) if gated else None

    def _output_order(self) -> torch.Tensor | None:
        """Output row → row of the q|k|v-ordered update (None where they coincide)."""
        if self.parts is None:
            return None
        first = [sum(self._part_rows(p) for p in range(part)) for part in range(3)]
        order = torch.cat([torch.arange(first[p] + start, first[p] + start + rows)
                           for p, start, rows in self.segments])  # fmt: skip
        return None if torch.equal(order, torch.arange(len(order))) else order

    def _part_rows(self, part: int) -> int:
        return sum(rows for p, _, rows in self.segments if p == part)

    def spaced(self) -> tuple[int, int] | None:
        """(start, step) where the parts' output rows are of one size and evenly spaced in the
        layer's output (q and v of a fused q|k|v): part i's from start + i·step. Else None."""
        return self._spacing

    def _parts_spacing(self) -> tuple[int, int] | None:
        if self.parts is None or self.lora_B.dim() != 3 or self._row_order is not None:
            return None
        first = [sum(self._part_rows(p) for p in range(part)) for part in range(3)]
        starts = [first[part] for part in self.parts]
        steps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
        if len(steps) > 1 or min(steps, default=1) <= 0:
            return None
        return starts[0], steps.pop() if steps else 0

    def up_matrix(self, up: torch.Tensor | None = None) -> torch.Tensor:
        """Every part's up-projection in one (out_features, n_parts·r) matrix: part p's B sits in
        its rows (q, k or v) and its own rank columns, zeros elsewhere. Formed once per forward
        from the parameters (out·n·r numbers), so the update is two matmuls per token. Built in
        q|k|v order (three pieces); a per-head layout (GPT-NeoX) then takes its rows in one
        gather rather than one piece per head. `up`: lora_B in the dtype to build in."""
        up = self.lora_B if up is None else up
        if self.parts is None:
            return up.view(-1, self.r)  # a view: its backward launches nothing
        first = [sum(self._part_rows(p) for p in range(part)) for part in range(4)]
        blocks = tuple((first[part], first[part + 1], self._offsets[i], self._offsets[i + 1])
                       for i, part in enumerate(self.parts))  # fmt: skip
        matrix = _PartsUp.apply(up, blocks, first[3], self.r)
        return matrix if self._row_order is None else matrix.index_select(0, self._row_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.folded:
            return self.forward_folded(x)
        if not self.enabled:
            return self.base_layer(x)
        x = compute_input(x)  # one cast read by the layer, A and the gate (placement.compute_input)
        node = isinstance(self.dropout, nn.Identity) and not torch.compiler.is_compiling()
        if node and self.gate is None:
            up = self.up_matrix(follow(self.lora_B, x))
            return LoRAUpdate.apply(x, self.base_layer(x), follow(self.lora_A, x), up, self.scaling)
        if node and x.dim() == 3:  # gated
            group = self.gate.__dict__.get("_group")  # UniPELT: one node per block (gate.py)
            joint = None if group is None else group.projection(self, x)
            if joint is not None:  # the block's q, k and v as one node (projections.py)
                return joint
            hidden = None if group is None else group.lora_hidden(self, x)
            linear = None if hidden is None else plain_linear(self.base_layer)
            spaced = None if linear is None else self.spaced()
            up = follow(self.lora_B, x) if spaced else self.up_matrix(follow(self.lora_B, x))
            if hidden is None:
                g = self.gate.per_position(x).to(x.dtype).unsqueeze(-1)  # (batch, ·, parts, 1)
                return GatedLoRAUpdate.apply(x, self.base_layer(x), follow(self.lora_A, x), up, g)
            if linear is None:
                return LoRAUp.apply(self.base_layer(x), hidden, up)
            bias = None if linear.bias is None else follow(linear.bias, x)
            return LinearLoRAUp.apply(x, follow(linear.weight, x), bias, hidden, up, spaced)
        out = self.base_layer(x)
        h = F.linear(self.dropout(x), follow(self.lora_A, x))  # (..., n_parts·r)
        scaling = self.scaling
        if self.gate is not None:  # one gate per adapted projection, on its rank block
            g = self.gate.per_position(x).to(h.dtype)  # (batch, positions or 1, n_parts)
            h = (h.unflatten(-1, (g.shape[-1], self.r)) * g.unsqueeze(-1)).flatten(-2)
            scaling = 1.0
        up = self.up_matrix(follow(self.lora_B, h))  # built in h's dtype from B's one cast
        # out + s·h·Bᵀ in one GEMM that reads `out` as its addend and scales in its epilogue
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(),
                           alpha=scaling)  # fmt: skip
        return flat.view(out.shape)

    def delta(self) -> tuple[torch.Tensor, None]:
        if self.gate is not None:
            raise NotMergeableError("gated LoRA cannot merge: its gate depends on the input")
        return as_weight(innermost(self), (self.up_matrix() @ self.lora_A) * self.scaling), None

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
    qkv_parts: which parts of a fused q|k|v projection get a LoRA pair; split_fused: False adapts
    a fused projection as one linear, one pair over its whole output (PEFT's way, and its file
    format); gated: multiply each projection's update by its own UniPELT gate G(x) instead of
    alpha / r."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | Sequence[str] | None = None
    qkv_parts: Sequence[str] = ("q", "v")
    split_fused: bool = True
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
        check_bool("LoRAConfig", "split_fused", self.split_fused)


@register_method("lora")
class LoRA(Method):
    config_cls = LoRAConfig
    default_lr = 3e-3
    merge_refusal = None

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        fused, segments = frozenset(), []
        if cfg.gated:
            self.merge_refusal = (
                "gated LoRA cannot merge: its gate G(x) depends on the input; train with "
                "gated=False to get a mergeable LoRA"
            )
        if cfg.targets is None:
            layout = layout_of(model)
            names = list(dict.fromkeys(n for b in layout.blocks for n in (b.query, b.value)))
        else:
            names = find_targets(model, cfg.targets, types=LINEARS)
            layout = layout_or_none(model)
        if layout is not None and layout.fused_qkv and cfg.split_fused:
            fused, segments = layout.fused_qkv, qkv_segments(layout)
        causal = layout is not None and layout.causal
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
                    segments=segments if f else (),
                    gated=cfg.gated,
                    causal=causal,
                ),
            )
        self._siblings = _siblings(layout, names) if layout is not None else []
        for name in self._siblings:
            share_input_cast(innermost(model.get_submodule(name)))

    def detach(self, model: nn.Module) -> None:
        super().detach(model)
        for name in getattr(self, "_siblings", []):
            unshare_input_cast(innermost(model.get_submodule(name)))
        self._siblings = []


def _siblings(layout, adapted: Sequence[str]) -> list[str]:
    """The linears that read the same input as an adapted one and are not adapted themselves
    (BERT's key beside LoRA's query and value): they read the adapted ones' cast of it."""
    chosen = set(adapted)
    found: list[str] = []
    for block in layout.blocks:
        for kind in ("attn_in", "mlp_in"):
            group = [n for n in block.site(kind)[1] if n]
            if chosen.intersection(group):
                found += [n for n in group if n not in chosen and n not in found]
    return found
