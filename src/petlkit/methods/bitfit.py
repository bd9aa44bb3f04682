"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Implemented as a learned bias offset per layer (zero at start), so the pretrained biases stay
untouched for `disable()` and the offset folds into the bias on `merge()`. Only layers that have
a bias are tuned, as in BitFit; `add_missing=True` also gives bias-free layers (e.g. a q|k|v
projection built with `qkv_bias=False`) an offset, which merging turns into a new bias.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from petlkit.config import MethodConfig, check_bool
from petlkit.errors import TargetError
from petlkit.methods.base import Method, StartsEmpty, Tuner, innermost
from petlkit.methods.folding import fold_refusal, run_with
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


class BiasGroup(StartsEmpty):
    """The biases b + δ of a BitFit's layers, formed for all of them in one foreach add (not one
    add kernel per layer), once per forward of the model: hooks on the model open the group
    before its forward and empty it after (a foreach add's backward keeps its inputs, so its
    sums must not outlive the forward). A layer run outside the model's forward forms its own.
    A layer joins on its first forward. Copies and pickles start empty."""

    def __init__(self) -> None:
        self.members: weakref.WeakSet = weakref.WeakSet()  # layers that ran in a forward
        self.totals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # this forward's
        self.active = False

    def begin(self, module: nn.Module, args: tuple) -> None:
        self.totals.clear()
        self.active = True

    def end(self, module: nn.Module, args: tuple, output) -> None:
        self.totals.clear()
        self.active = False

    def bias(self, tuner: BiasTuner) -> torch.Tensor:
        made = self.totals.get(tuner)
        if made is not None:
            return made
        self.members.add(tuner)
        members = list(self.members)
        layers = [innermost(t.base_layer) for t in members]
        with_bias = [i for i, layer in enumerate(layers) if layer.bias is not None]
        bases = [layers[i].bias.to(_wide(layers[i].bias)) for i in with_bias]
        deltas = [members[i].bias_delta.to(layers[i].bias.device, _wide(layers[i].bias))
                  for i in with_bias]  # fmt: skip
        sums = torch._foreach_add(bases, deltas) if bases else []
        made = dict(zip(with_bias, sums, strict=True))
        for i, (member, layer) in enumerate(zip(members, layers, strict=True)):
            total = made.get(i, member.bias_delta)
            bias = total.to(device=layer.weight.device, dtype=layer.weight.dtype)
            self.totals[member] = bias
        return self.totals[tuner]


def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class BiasTuner(Tuner):
    def __init__(self, base_layer: nn.Module, owner: str, group: BiasGroup | None = None):
        super().__init__(base_layer, owner)
        inner = innermost(base_layer)
        self.bias_delta = nn.Parameter(torch.zeros(_out_features(inner)))
        self._channel_dim = 1 if isinstance(inner, nn.Conv2d) else -1
        self.__dict__["_group"] = group  # shared by the method's layers, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.folded or fold_refusal(self.base_layer) is None:
            # the layer run once with bias b + δ (bias-sized work): folded or not, no pass over
            # its output forward and none backward beyond the bias gradient the layer forms
            group = self._group
            if group is None or not group.active or torch.compiler.is_compiling():
                return self.forward_folded(x)
            layer = self.base_layer
            return run_with(layer, x, layer.weight, group.bias(self))
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
        self._group = group = BiasGroup()
        for name in names:
            self.wrap(model, name, lambda base: BiasTuner(base, self.name, group))
        self._handles = [model.register_forward_pre_hook(group.begin),
                         model.register_forward_hook(group.end)]  # fmt: skip

    def detach(self, model: nn.Module) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        super().detach(model)
