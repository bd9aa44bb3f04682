"""Bottleneck adapters: Houlsby et al. (2019, after attention and FFN) and Pfeiffer et al.
(2021, after the FFN only): out = h + W_up·σ(W_down·h), zero-initialised up-projection.
Gated (UniPELT): out = h + G(h)·W_up·σ(W_down·h), one gate per adapter."""

from __future__ import annotations

import dataclasses

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
from petlkit.methods.placement import CastLinear
from petlkit.registry import register_method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = ("pfeiffer", "houlsby")


class Bottleneck(nn.Module):
    def __init__(self, width: int, reduction: int, activation: str, dropout: float) -> None:
        super().__init__()
        hidden = max(1, width // reduction)
        self.down = CastLinear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = CastLinear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(h))))


class AdapterTuner(Tuner):
    """Adds a bottleneck to the output of the wrapped layer (before the residual add)."""

    def __init__(
        self, base_layer: nn.Linear, owner: str, adapter: Bottleneck, gate: Gate | None = None
    ) -> None:
        super().__init__(base_layer, owner)
        self.adapter = adapter
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if not self.enabled:
            return h
        update = self.adapter(h)
        if self.gate is not None:
            update = update * self.gate(h).view(-1, *([1] * (update.dim() - 1))).to(h.dtype)
        return h + update


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """placement: 'pfeiffer' (after the FFN) or 'houlsby' (after attention and FFN);
    bottleneck width = model width // reduction_factor; gated: a UniPELT gate per adapter."""

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    dropout: float = 0.0
    gated: bool = False

    def validate(self) -> None:
        check_choice("AdapterConfig", "placement", self.placement, PLACEMENTS)
        check_positive_int("AdapterConfig", "reduction_factor", self.reduction_factor)
        check_choice("AdapterConfig", "non_linearity", self.non_linearity, tuple(ACTIVATIONS))
        check_probability("AdapterConfig", "dropout", self.dropout)
        check_bool("AdapterConfig", "gated", self.gated)


@register_method("adapter")
class Adapter(Method):
    config_cls = AdapterConfig
    merge_refusal = "a bottleneck adapter has a non-linearity, so it cannot fold into weights"

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        layout = layout_of(model)
        names = [b.mlp_out for b in layout.blocks]
        if cfg.placement == "houlsby":
            names += [b.attn_out for b in layout.blocks]
        for name in names:
            bottleneck = Bottleneck(
                layout.width, cfg.reduction_factor, cfg.non_linearity, cfg.dropout
            )
            gate = Gate(layout.width) if cfg.gated else None
            self.wrap(
                model, name, lambda base, a=bottleneck, g=gate: AdapterTuner(base, self.name, a, g)
            )
