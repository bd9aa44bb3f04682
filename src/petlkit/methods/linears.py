"""The layers methods treat as linear maps: nn.Linear and transformers' Conv1D (GPT-2), which
stores its weight transposed, (in, out). One place knows the difference."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEARS = (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def in_out(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a linear-like layer."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def as_weight(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) update in the layout of the layer's own weight."""
    return delta.t() if isinstance(module, Conv1D) else delta


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), whatever its storage."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def plain_linear(module: nn.Module) -> nn.Linear | None:
    """The module when calling it is exactly `F.linear(x, weight, bias)` (an nn.Linear with no
    hooks, no parametrization and its own forward; petlkit's `share_input_cast` reader is allowed:
    the layer reads the cast its caller passes), so a method may compute it inside a node of its
    own; else None (call the module)."""
    from torch.nn.modules import module as torch_module

    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return None
    from petlkit.methods.placement import read_shared_cast

    pre = [h for h in module._forward_pre_hooks.values() if h is not read_shared_cast]
    hooks = (module._forward_hooks, pre, torch_module._global_forward_hooks,
             torch_module._global_forward_pre_hooks)  # fmt: skip
    return None if any(hooks) else module
