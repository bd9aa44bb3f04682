"""Folded training: a mergeable method's update formed into the weight it adapts, every forward.

Unfolded, a method adds work on every token: LoRA's two thin matmuls, BitFit's and SSF's extra
pass over a layer's output, SaS's transform of a site before q/k/v and fc1 read it. Folded, the
forward forms W' = W + ΔW(θ) and b' = b + Δb(θ) from the parameters (work proportional to the
weight, not to the tokens) and runs the layer once with them; autograd carries the gradient from
W' back to θ. Both forms compute the same function: outputs and gradients agree up to rounding
(tests/test_folding.py). W' is summed in float32 (at least) and rounded once to the weight's
dtype, the same rounding a merged model has.

Which form is faster depends on the device and on the tokens per step: folding removes the
per-token passes but its backward forms the weight-sized gradient dL/dW' (one GEMM over the
tokens). `TrainConfig.fold = "auto"` times both forms on the first training steps and keeps the
faster (train/folding.py); "on" and "off" force one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from petlkit.methods.linears import Conv1D

FOLDABLE_LAYERS = (nn.Linear, nn.LayerNorm, nn.Conv2d, Conv1D)


def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def folded(base: torch.Tensor | None, delta: torch.Tensor | None, like: torch.Tensor):
    """base + delta summed in float32 (at least) on the base's device, in `like`'s dtype; None
    when both are None (a layer without bias and no bias update)."""
    if delta is None:
        return base
    if base is None:
        return delta.to(device=like.device, dtype=like.dtype)
    wide = _wide(base)
    total = base.to(wide) + delta.to(device=base.device, dtype=wide)
    return total.to(like.dtype)


def run_folded(
    layer: nn.Module, x: torch.Tensor, d_weight: torch.Tensor | None, d_bias: torch.Tensor | None
) -> torch.Tensor:
    """`layer(x)` computed with its weight and bias plus (d_weight, d_bias), in one call."""
    weight = folded(layer.weight, d_weight, layer.weight)
    return run_with(layer, x, weight, folded(layer.bias, d_bias, layer.weight))


def run_with(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`layer(x)` computed with the given weight and bias in place of its own."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    if isinstance(layer, Conv1D):  # weight stored (in, out)
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[1])
    raise TypeError(f"cannot fold into a {type(layer).__name__}; foldable: nn.Linear, "
                    "nn.LayerNorm, nn.Conv2d")  # fmt: skip


def fold_refusal(layer: nn.Module) -> str | None:
    """Why an update cannot fold into `layer` (None: it can)."""
    if hasattr(layer, "base_layer"):
        return (f"another method ({layer.owner!r}) wraps the layer; stacked methods train "
                "unfolded")  # fmt: skip
    if not isinstance(layer, FOLDABLE_LAYERS):
        return f"a {type(layer).__name__} has no weight to fold into"
    if getattr(layer, "weight", None) is None:
        return "the layer has no affine weight"
    return None
