"""Full fine-tuning and linear probing: the two ends of the trainable-parameter scale."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from petlkit.config import MethodConfig
from petlkit.errors import PetlError
from petlkit.methods.base import Method, backbone_parameters
from petlkit.registry import register_method


@dataclasses.dataclass(frozen=True)
class FullFineTuneConfig(MethodConfig):
    """Train every backbone weight. keep_pretrained: keep a copy of every pretrained weight
    beside the model, on its device (one more backbone's worth of memory), so that `disable()`
    and removing the method give the pretrained backbone back exactly; False keeps none (a
    larger model fits): the method then cannot be bypassed, and removing it leaves the
    fine-tuned weights."""

    keep_pretrained: bool = True


def _key(name: str) -> str:
    return name.replace(".", "__")


@register_method("full")
class FullFineTune(Method):
    config_cls = FullFineTuneConfig
    default_lr = 1e-4
    merge_refusal = None  # the update is already in the weights: merge has nothing to do
    trains_backbone = True

    def attach(self, model: nn.Module) -> None:
        self._params = backbone_parameters(model)
        # buffers (not saved in state dicts): they move with the model on .to(device)
        self.pretrained = nn.Module()
        if self.config.keep_pretrained:
            for name, param in self._params.items():
                self.pretrained.register_buffer(_key(name), param.detach().clone(),
                                                persistent=False)  # fmt: skip
        self._swapped = False

    def disable_refusal(self) -> str | None:
        if self.config.keep_pretrained:
            return None
        return (f"{self.name!r} (full) keeps no pretrained weights (keep_pretrained=False), so "
                "it cannot be bypassed; attach it with keep_pretrained=True to compare with the "
                "pretrained model")  # fmt: skip

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return backbone_parameters(model)

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        refusal = None if enabled else self.disable_refusal()
        if refusal is not None:
            raise PetlError(refusal)
        super().set_enabled(model, enabled)
        if enabled == self._swapped:  # swap tensors, no copies
            for name, param in self._params.items():
                kept = getattr(self.pretrained, _key(name))
                setattr(self.pretrained, _key(name), param.data)
                param.data = kept
            self._swapped = not enabled

    def detach(self, model: nn.Module) -> None:
        """Removing full fine-tuning gives the pretrained backbone back (with keep_pretrained=False
        there is none to give: the fine-tuned weights stay)."""
        if not self.config.keep_pretrained:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                if not self._swapped:
                    param.copy_(getattr(self.pretrained, _key(name)))

    def merge(self, model: nn.Module) -> None:  # nothing to fold
        pass

    def unmerge(self, model: nn.Module) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    """Train only the task head on the frozen backbone's features."""


@register_method("linear")
class LinearProbe(Method):
    config_cls = LinearProbeConfig
    default_lr = 1e-2
    merge_refusal = None

    def attach(self, model: nn.Module) -> None:
        from petlkit.layout import head_names

        if not head_names(model):
            raise PetlError(
                f"linear probing trains only a task head, and {type(model).__name__} has none "
                "(a language-model head stays frozen); name the modules to train with "
                "attach(..., heads=[...]) or use another method"
            )
