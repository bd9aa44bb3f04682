"""Bottleneck adapters: Houlsby et al. (2019, after attention and FFN) and Pfeiffer et al.
(2021, after the FFN only), A(x) = W_up·σ(W_down·x); gated (UniPELT): G(x)·A(x).

Placements, as AdapterHub's `adapters` (and so UniPELT's original code) compute them:
- houlsby: on each sublayer's output projection h (before the residual add and the layer's
  LayerNorm): h → h + A(h);
- pfeiffer, post-norm encoders (BERT family; `original_ln_before`, `residual_before_ln`,
  `original_ln_after`): with y = h_ffn + residual, the adapter reads x = LN(y), its output is
  added to h_ffn, and the layer's LayerNorm follows: out = LN(y + G(x)·A(x));
- pfeiffer, pre-norm ViT (no LayerNorm after the FFN): the adapter reads the block output
  y = residual + h_ffn: out = y + G(y)·A(y).
The up-projection starts at zero (`up_init="zero"`), so the model starts as the pretrained one;
`up_init="bert"` draws it from N(0, 0.02) as the original code's BERT initialisation does.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from petlkit.config import (
    MethodConfig,
    check_bool,
    check_choice,
    check_positive_int,
    check_probability,
)
from petlkit.layout import layout_of
from petlkit.methods.base import Method, Tuner
from petlkit.methods.gate import Gate
from petlkit.methods.placement import CastLinear, cast_to, compute_dtype, compute_input
from petlkit.methods.residual_adapter import GatedResidualBottleneck, ResidualBottleneck
from petlkit.methods.targeting import get_module
from petlkit.methods.trained_casts import join
from petlkit.registry import register_method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = ("pfeiffer", "houlsby")
UP_INITS = ("zero", "bert")


class Bottleneck(nn.Module):
    """G(x)·W_up·σ(W_down·x) (no gate: G = 1)."""

    def __init__(self, width: int, cfg: AdapterConfig, causal: bool = False) -> None:
        super().__init__()
        hidden = max(1, width // cfg.reduction_factor)
        self.down = CastLinear(width, hidden)
        self.act = ACTIVATIONS[cfg.non_linearity]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.up = CastLinear(hidden, width)
        if cfg.up_init == "zero":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        self.gate = Gate(width, causal=causal) if cfg.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = compute_input(x)  # one cast read by down and the gate (placement.compute_input)
        update = self.up(self.dropout(self.act(self.down(x))))
        if self.gate is not None:
            update = update * self.gate.per_position(x)  # (batch, positions or 1, 1)
        return update

    def residual(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """y + G(x)·A(x), x = y unless given; ReLU adapters without dropout, gated or not, run
        as one fused node (residual_adapter.py: the same function, fewer kernels)."""
        source = y if x is None else x
        fusable = (isinstance(self.act, nn.ReLU) and isinstance(self.dropout, nn.Identity)
                   and source.is_floating_point()
                   and not torch.compiler.is_compiling())  # fmt: skip
        if not fusable:
            return y + self(source)
        dtype = compute_dtype(source)
        weights = [self.down.weight, self.down.bias, self.up.weight, self.up.bias]
        if self.gate is not None:  # the gate's row beside the down-projection's (trained_casts.py)
            weights += [self.gate.linear.weight, self.gate.linear.bias]
            join((self.down.weight, self.gate.linear.weight))
            join((self.down.bias, self.gate.linear.bias))
        low = [cast_to(t, dtype, source.device) for t in weights]
        if self.gate is None:
            return ResidualBottleneck.apply(y, x, dtype, *low)
        return GatedResidualBottleneck.apply(y, x, dtype, self.gate.causal, *low)


class AdapterTuner(Tuner):
    """Houlsby: h → h + A(h) on a sublayer's output projection."""

    def __init__(self, base_layer: nn.Module, owner: str, adapter: Bottleneck) -> None:
        super().__init__(base_layer, owner)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return self.adapter.residual(h) if self.enabled else h


class PostNormAdapterTuner(Tuner):
    """Pfeiffer on a post-norm encoder: wraps the LayerNorm after the FFN; y → LN(y + A(LN(y)))."""

    def __init__(self, base_layer: nn.Module, owner: str, adapter: Bottleneck) -> None:
        super().__init__(base_layer, owner)
        self.adapter = adapter

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.base_layer(y)
        return self.base_layer(self.adapter.residual(y, x)) if self.enabled else x


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """placement: 'pfeiffer' (after the FFN) or 'houlsby' (after attention and FFN);
    bottleneck width = model width // reduction_factor; gated: a UniPELT gate per adapter,
    computed from the adapter's input; up_init: 'zero' or 'bert' (N(0, 0.02))."""

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    dropout: float = 0.0
    gated: bool = False
    up_init: str = "zero"

    def validate(self) -> None:
        check_choice("AdapterConfig", "placement", self.placement, PLACEMENTS)
        check_positive_int("AdapterConfig", "reduction_factor", self.reduction_factor)
        check_choice("AdapterConfig", "non_linearity", self.non_linearity, tuple(ACTIVATIONS))
        check_probability("AdapterConfig", "dropout", self.dropout)
        check_bool("AdapterConfig", "gated", self.gated)
        check_choice("AdapterConfig", "up_init", self.up_init, UP_INITS)


@register_method("adapter")
class Adapter(Method):
    config_cls = AdapterConfig
    default_lr = 3e-3
    merge_refusal = "a bottleneck adapter has a non-linearity, so it cannot fold into weights"

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        layout = layout_of(model)
        self._handles: list = []

        def make() -> Bottleneck:
            return Bottleneck(layout.width, cfg, layout.causal)

        if cfg.placement == "houlsby":
            for block in layout.blocks:
                for name in (block.mlp_out, block.attn_out):
                    self.wrap(model, name, lambda base: AdapterTuner(base, self.name, make()))
            return
        post_norm = [b.mlp_norm for b in layout.blocks if b.mlp_norm is not None]
        for name in post_norm:
            self.wrap(model, name, lambda base: PostNormAdapterTuner(base, self.name, make()))
        if not post_norm:  # pre-norm: on the block's output (the residual stream)
            self.block_adapters = nn.ModuleList(make() for _ in layout.blocks)
            for index, block in enumerate(layout.blocks):
                hook = partial(self._after_block, index)
                self._handles.append(get_module(model, block.block).register_forward_hook(hook))

    def _after_block(self, index: int, module: nn.Module, args: tuple, output):
        if not self.enabled:
            return None
        if isinstance(output, tuple):  # transformers blocks may return (hidden, extras...)
            y = output[0]
            return (self.block_adapters[index].residual(y), *output[1:])
        return self.block_adapters[index].residual(output)

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().detach(model)
