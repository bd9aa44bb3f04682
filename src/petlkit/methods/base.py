"""What every method is: an nn.Module holding its own parameters that injects into a model.

Two ways to inject: wrap target modules in a `Tuner` (it keeps the original as `base_layer`), or
register hooks on the backbone's declared extension points. A method never edits a forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from petlkit.config import MethodConfig
from petlkit.errors import NotFoldableError, NotMergeableError
from petlkit.methods.folding import run_folded
from petlkit.methods.targeting import canonical_name, get_slot


class StartsEmpty:
    """A helper its method's tuners share, to make per-forward work once for all of them (1/γ
    of every scale, every layer norm's affine, every scaled linear's bias): what it holds
    belongs to the process running, so copies and pickles start empty."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict):
        return type(self)()


class Tuner(nn.Module):
    """A wrapper around one module of the backbone, owned by one named method instance."""

    def __init__(self, base_layer: nn.Module, owner: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.owner = owner
        self.enabled = True
        self.folded = False  # train with the update folded into the layer (methods/folding.py)

    @property
    def weight(self) -> torch.Tensor | None:
        """The wrapped layer's weight (model code reads `layer.weight.dtype` and the like)."""
        return getattr(innermost(self), "weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(innermost(self), "bias", None)

    def own_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def delta(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ΔW, Δb) to add to the base layer's weight and bias when merging."""
        raise NotMergeableError(f"{type(self).__name__} has no weight-space update to merge")

    def fold_refusal(self) -> str | None:
        """None when the update can train folded into the wrapped layer, else why not."""
        return f"{type(self).__name__} has no weight-space update to fold"

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer run once with its weights plus this wrapper's (ΔW, Δb)."""
        return run_folded(self.base_layer, x, *self.delta())


def innermost(module: nn.Module) -> nn.Module:
    """The plain module under any number of wrappers (methods stacked on one layer)."""
    while isinstance(module, Tuner):
        module = module.base_layer
    return module


def add_in_float32(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """weight += delta, summed in (at least) float32 on the weight's device, rounded once."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    total = weight.to(wide) + delta.to(device=weight.device, dtype=wide)
    weight.copy_(total)


def backbone_parameters(
    model: nn.Module, heads: tuple[str, ...] | None = None
) -> dict[str, nn.Parameter]:
    """Canonical name → parameter of the pretrained backbone (no trained head, nothing a method
    added); `heads`: the trained heads' names (None: the model's, layout.head_names)."""
    from petlkit.layout import head_names

    added = {id(p) for m in model.modules() if isinstance(m, Tuner) for _, p in m.own_parameters()}
    names = head_names(model) if heads is None else heads
    trained = {id(p) for h in names for p in model.get_submodule(h).parameters()}
    return {
        canonical_name(n): p
        for n, p in model.named_parameters()
        if id(p) not in trained and id(p) not in added
    }


def _holder(model: nn.Module, name: str, tuner: Tuner) -> tuple[nn.Module, str]:
    """(module, attribute) that holds `tuner`: the parent's slot, or an outer wrapper's
    `base_layer` when another method wrapped this one."""
    holder, attr = get_slot(model, name)
    current = getattr(holder, attr)
    while current is not tuner:
        holder, attr = current, "base_layer"
        current = current.base_layer
    return holder, attr


class Method(nn.Module):
    """Base of all methods. `attach` injects into a task model; `detach` undoes it exactly."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: None if mergeable, else the reason merging is refused.
    merge_refusal: ClassVar[str | None] = "this method's update is not linear in the weights"
    #: True for methods that train backbone weights in place (full fine-tuning).
    trains_backbone: ClassVar[bool] = False
    #: Attributes holding per-forward caches (tensors with autograd history): not copied.
    transient: ClassVar[tuple[str, ...]] = ()
    #: True for methods that fold into the linears other methods wrap (SaS): merged after them.
    merge_late: ClassVar[bool] = False
    #: The learning rate training uses when none is given (the here-scale presets' rate).
    default_lr: ClassVar[float] = 1e-3

    def __getstate__(self) -> dict:
        """Copies and pickles drop per-forward caches (a copy recomputes them)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        for name in self.transient:
            if name in state:
                state[name] = None
        return state

    def __init__(self, config: MethodConfig, name: str) -> None:
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}")
        self.config = config
        self.name = name
        self.enabled = True
        self.folded = False
        self._merged: list[
            tuple[nn.Module, str, Tuner, torch.Tensor | None, torch.Tensor | None]
        ] = []

    # -- injection ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        """Remove every wrapper this method added, leaving the modules it wrapped."""
        for name, tuner in self.tuners(model):
            parent, attr = get_slot(model, name)
            self._unwrap(parent, attr, tuner)

    def wrap(self, model: nn.Module, name: str, tuner_factory) -> Tuner:
        parent, attr = get_slot(model, name)
        tuner = tuner_factory(getattr(parent, attr))
        setattr(parent, attr, tuner)
        return tuner

    def _unwrap(self, parent: nn.Module, attr: str, tuner: Tuner) -> None:
        current = getattr(parent, attr)
        if current is tuner:
            setattr(parent, attr, tuner.base_layer)
            return
        while isinstance(current, Tuner):  # another method wrapped ours: splice ours out
            if current.base_layer is tuner:
                current.base_layer = tuner.base_layer
                return
            current = current.base_layer

    def tuners(self, model: nn.Module) -> list[tuple[str, Tuner]]:
        """(canonical name, tuner) for every wrapper this method owns in `model`."""
        return [
            (canonical_name(n), m)
            for n, m in model.named_modules()
            if isinstance(m, Tuner) and self.owns(m.owner)
        ]

    def owns(self, owner: str) -> bool:
        """A tuner's owner is this method or one of its parts (named `<name>.<part>`)."""
        return owner == self.name or owner.startswith(self.name + ".")

    # -- parameters --------------------------------------------------------------------------
    def added_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Canonical name → parameter for everything this method adds to the backbone."""
        params = {f"method.{n}": p for n, p in self.named_parameters()}
        for name, tuner in self.tuners(model):
            params.update({f"{name}.{n}": p for n, p in tuner.own_parameters()})
        return params

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Canonical name → parameter for everything this method trains (head excluded)."""
        return self.added_parameters(model)

    def export(self, model: nn.Module) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
        """(config, tensors) an adapter file needs for inference; methods with training-only
        parts (prefix tuning's reparameterisation MLP) return the compact form."""
        return self.config, dict(self.trainable(model))

    def disable_refusal(self) -> str | None:
        """None when the method can be bypassed (`disable()`, `set_active` without it), else why
        not; checked for every method before any is bypassed."""
        return None

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        self.enabled = enabled
        for _, tuner in self.tuners(model):
            tuner.enabled = enabled

    # -- folded training (methods/folding.py) -------------------------------------------------
    def fold_refusal(self, model: nn.Module) -> str | None:
        """None when the method can train folded into the weights it adapts, else why not."""
        if self.merge_refusal is not None:
            return self.merge_refusal
        if self.merged:
            return "it is merged into the weights already (unmerge first)"
        tuners = self.tuners(model)
        if not tuners:
            return "it wraps no layer to fold into"
        for name, tuner in tuners:
            reason = tuner.fold_refusal()
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def set_folded(self, model: nn.Module, folded: bool) -> None:
        """Train with the update formed into the weights each forward (True) or applied to
        the activations (False); both compute the same function."""
        if folded:
            reason = self.fold_refusal(model)
            if reason is not None:
                raise NotFoldableError(
                    f"{self.name!r} ({self.config.method}) cannot train folded: {reason}; "
                    "train unfolded (fold: off) or let fold: auto decide"
                )
        for _, tuner in self.tuners(model):
            tuner.folded = folded
        self.folded = folded

    # -- merge -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self._merged)

    def check_mergeable(self) -> None:
        if self.merge_refusal is not None:
            raise NotMergeableError(f"{self.name!r} ({self.config.method}): {self.merge_refusal}")

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """Fold every wrapper's update into the module it wraps and splice the wrapper out
        (methods stacked on one layer merge inner first: PetlModel.merge keeps attach order)."""
        self.check_mergeable()
        tuners = self.tuners(model)
        for name, tuner in tuners:
            if isinstance(tuner.base_layer, Tuner):
                raise NotMergeableError(
                    f"{name}: {tuner.base_layer.owner!r} wraps it inside {self.name!r}; merge "
                    f"{tuner.base_layer.owner!r} first (PetlModel.merge does, in attach order)"
                )
        for name, tuner in tuners:
            base = tuner.base_layer
            d_weight, d_bias = tuner.delta()
            bias = getattr(base, "bias", None)  # RMSNorms have none at all
            old_bias = None if bias is None else bias.detach().clone()
            old_weight = None if base.weight is None else base.weight.detach().clone()
            holder, attr = _holder(model, name, tuner)
            self._merged.append((holder, attr, tuner, old_weight, old_bias))
            if d_weight is not None:
                add_in_float32(base.weight, d_weight)
            if d_bias is not None:
                if bias is None:  # the base layer's dtype and device, not the update's
                    base.bias = nn.Parameter(base.weight.new_zeros(d_bias.shape), False)
                add_in_float32(base.bias, d_bias)
            setattr(holder, attr, base)

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        """Restore the exact original weights and put the wrappers back."""
        for parent, attr, tuner, weight, bias in reversed(self._merged):
            base = tuner.base_layer
            if weight is not None:
                base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
            elif getattr(base, "bias", None) is not None:  # merging gave it one
                base.bias = None
            setattr(parent, attr, tuner)
        self._merged.clear()
