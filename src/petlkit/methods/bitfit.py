"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Implemented as a learned bias offset per layer (zero at start), so the pretrained biases stay
untouched for `disable()` and the offset folds into the bias on `merge()`. Only layers that have
a bias are tuned, as in BitFit; `add_missing=True` also gives bias-free layers (e.g. a q|k|v
projection built with `qkv_bias=False`) an offset, which merging turns into a new bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from petlkit.config import MethodConfig, check_bool
from petlkit.errors import TargetError
from petlkit.methods.base import Method, Tuner, innermost
from petlkit.methods.folding import fold_refusal
from petlkit.methods.linears import Conv1D
from petlkit.methods.placement import follow
from petlkit.methods.targeting import find_targets, get_module
from petlkit.registry import register_method

BIAS_TYPES = (nn.Linear, nn.LayerNorm, nn.Conv2d, Conv1D)


def _out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.nf
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.normalized_shape[-1]


class BiasTuner(Tuner):
    def __init__(self, base_layer: nn.Module, owner: str) -> None:
        super().__init__(base_layer, owner)
        inner = innermost(base_layer)
        self.bias_delta = nn.Parameter(torch.zeros(_out_features(inner)))
        self._channel_dim = 1 if isinstance(inner, nn.Conv2d) else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.folded or fold_refusal(self.base_layer) is None:
            # the layer run once with bias b + δ (bias-sized work): folded or not, no pass over
            # its output forward and none backward beyond the bias gradient the layer forms
            return self.forward_folded(x)
        out = self.base_layer(x)  # a wrapped layer (methods stacked): δ added to its output
        delta = follow(self.bias_delta, out)
        if self._channel_dim == 1:
            return out + delta.view(1, -1, 1, 1)
        return out + delta

    def delta(self) -> tuple[None, torch.Tensor]:
        return None, self.bias_delta

    def fold_refusal(self) -> str | None:
        return fold_refusal(self.base_layer)


@dataclasses.dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """targets: full-match regex or suffix list over Linear, LayerNorm and Conv2d modules;
    add_missing: also tune layers that have no bias (BitFit proper does not)."""

    targets: str | Sequence[str] = ".*"
    add_missing: bool = False

    def validate(self) -> None:
        check_bool("BitFitConfig", "add_missing", self.add_missing)


@register_method("bitfit")
class BitFit(Method):
    config_cls = BitFitConfig
    merge_refusal = None

    def attach(self, model: nn.Module) -> None:
        names = find_targets(model, self.config.targets, types=BIAS_TYPES)
        if not self.config.add_missing:
            names = [n for n in names if get_module(model, n).bias is not None]
        if not names:
            raise TargetError(
                f"BitFit: none of the targeted layers of {type(model).__name__} has a bias (its "
                "linears and norms are bias-free, as in LLaMA-style decoders), so there is nothing "
                "to tune; pass add_missing=true to give each targeted layer a bias offset"
            )
        for name in names:
            self.wrap(model, name, lambda base: BiasTuner(base, self.name))
