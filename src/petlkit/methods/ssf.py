"""SSF (Lian et al., 2022): y = γ ⊙ f(x) + β after every linear, layer norm and the patch
embedding of the backbone (as the SSF reference does); γ ~ N(1, σ), β ~ N(0, σ) per output
channel. Linear in f's output, so it merges: W' = diag(γ)·W, b' = γ ⊙ b + β.

An RMSNorm (LLaMA-style decoders, T5) has no bias to take β, so SSF scales it only:
y = γ ⊙ RMSNorm(x), merged as w' = γ·(offset + w) − offset (offset 1 where the norm computes
(1 + w)·x̂, as Gemma's does). GPT-2's Conv1D linears (weight stored input × output) are scaled per
output column."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from petlkit.config import MethodConfig, check_finite
from petlkit.errors import ConfigError, TargetError
from petlkit.layout import layout_or_none, untargetable
from petlkit.methods.base import Method, Tuner, innermost
from petlkit.methods.channel_sums import ScaleInverses, accumulate_dtype, channel_sums, inverse
from petlkit.methods.folding import fold_refusal
from petlkit.methods.linear_offsets import LinearOffsets, linear_offset
from petlkit.methods.norm_affines import NormAffines
from petlkit.methods.placement import compute_dtype, compute_input, follow
from petlkit.methods.targeting import (
    canonical_name,
    find_targets,
    inside_a_method,
    read_directly,
)
from petlkit.methods.trained_casts import distributed, forward_token, hand_over, open_casts
from petlkit.registry import register_method


def is_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm of any library: a 1-D scale, no bias (torch's, or transformers' per family)."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    named = isinstance(module, nn.RMSNorm) or name.endswith("RMSNorm") or name == "T5LayerNorm"
    return named and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class SSFTuner(Tuner):
    def __init__(self, base_layer: nn.Module, owner: str, std: float, offset: float = 0.0,
                 inverses: ScaleInverses | None = None,
                 norms: NormAffines | None = None,
                 offsets: LinearOffsets | None = None):  # fmt: skip
        super().__init__(base_layer, owner)
        self._inverses = inverses  # shared by the method's tuners: 1/γ for all at once
        self._norms = norms  # and every layer norm's affine
        self._offsets = offsets  # and every scaled linear's bias
        inner = innermost(base_layer)
        channels = _channels(base_layer)
        self._channel_dim = 1 if isinstance(inner, nn.Conv2d) else -1
        self._norm_offset = offset if is_rms_norm(inner) else None  # None: not an RMSNorm
        self.ssf_scale = nn.Parameter(1.0 + std * torch.randn(channels))
        if self._norm_offset is None:
            self.ssf_shift = nn.Parameter(std * torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.folded:
            return self.forward_folded(x)
        if self.enabled and type(self.base_layer) is nn.LayerNorm:
            return self._layer_norm(x)
        if self.enabled and self._scales_a_frozen_linear(x):
            return self._scaled_linear(x)
        out = self.base_layer(x)
        if not self.enabled:
            return out
        scale = follow(self.ssf_scale, out)
        if self._norm_offset is not None:  # RMSNorm: scale only
            return out * scale
        shift = follow(self.ssf_shift, out)
        if self._channel_dim == 1:  # a convolution's channels come first: (batch, C, H, W)
            shift, scale = shift.view(-1, 1, 1), scale.view(-1, 1, 1)
        if torch.compiler.is_compiling():  # the compiler fuses the plain form's passes
            return torch.addcmul(shift, out, scale)
        return _ScaleShift.apply(out, scale, shift)

    def _scales_a_frozen_linear(self, x: torch.Tensor) -> bool:
        """A plain frozen nn.Linear, read in its own dtype or under autocast: `_ScaledLinear`."""
        base = self.base_layer
        if type(base) is not nn.Linear or torch.compiler.is_compiling():
            return False
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        return base.weight.dtype == compute_dtype(x) or torch.is_autocast_enabled(x.device.type)

    def _scaled_linear(self, x: torch.Tensor) -> torch.Tensor:
        x = compute_input(x)  # the dtype autocast would compute the layer in
        forward = forward_token()
        batched = not distributed() and forward is not None
        inverses = self._inverses if batched else None
        if inverses is not None and torch.is_grad_enabled():
            inverses.read(self.ssf_scale)
        if batched and self._offsets is not None:
            bias = self._offsets.of(self, SSFTuner._offset_inputs, x.dtype, forward)
        else:
            bias = linear_offset(*self._offset_inputs(), x.dtype)
        return _ScaledLinear.apply(x, self.base_layer.weight, bias, self.ssf_scale,
                                   self.ssf_shift, inverses, forward)  # fmt: skip

    def _offset_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(c, γ, β) of this linear: its frozen bias and the trained scale and shift."""
        return self.base_layer.bias, self.ssf_scale, self.ssf_shift

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """γ ⊙ LN(x) + β as the layer norm with weight γ ⊙ w and bias γ ⊙ b + β: the same
        function, formed from channel-sized tensors, where scaling the output is a pass over it
        each way and keeps it for γ's gradient (the norm keeps its input anyway)."""
        norm = self.base_layer
        if norm.bias is None:
            scale, shift = self._norm_inputs()[2:]
            weight, bias = norm.weight * scale, shift
        elif self._norms is not None and not distributed() and forward_token() is not None:
            weight, bias = self._norms.pair(self, SSFTuner._norm_inputs, forward_token())
        else:
            weight, bias = _NormAffine.apply(*self._norm_inputs())
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def _norm_inputs(self) -> tuple[torch.Tensor, ...]:
        """(w, b, γ, β) of this layer norm, γ and β in the norm's dtype on its device."""
        norm = self.base_layer
        scale, shift = follow(self.ssf_scale, norm.weight), follow(self.ssf_shift, norm.weight)
        return norm.weight, norm.bias, scale, shift

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = innermost(self.base_layer)
        weight = base.weight
        factor = self.ssf_scale - 1.0
        if self._norm_offset is not None:  # (γ − 1)·(offset + w)
            return factor * (weight + self._norm_offset), None
        if _is_conv1d(base):  # output channels are the columns
            return factor.view(1, -1) * weight, self.ssf_shift + factor * base.bias
        d_weight = factor.view(-1, *([1] * (weight.dim() - 1))) * weight
        d_bias = self.ssf_shift.clone()
        if base.bias is not None:
            d_bias = d_bias + factor * base.bias
        return d_weight, d_bias

    def fold_refusal(self) -> str | None:
        return fold_refusal(self.base_layer)


class _ScaleShift(torch.autograd.Function):
    """γ ⊙ out + β (one addcmul) with autograd's gradients minus a pass: `addcmul`'s own
    backward also multiplies `out` by its unit value before γ's product."""

    @staticmethod
    def forward(ctx, out, scale, shift):  # noqa: D102 (torch's interface)
        ctx.save_for_backward(out, scale)
        ctx.shift_shape = shift.shape
        return torch.addcmul(shift, out, scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out, scale = ctx.saved_tensors
        grad_out = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = _sum_to(grad * out, scale.shape) if ctx.needs_input_grad[1] else None
        grad_shift = _sum_to(grad, ctx.shift_shape) if ctx.needs_input_grad[2] else None
        return grad_out, grad_scale, grad_shift


class _ScaledLinear(torch.autograd.Function):
    """γ ⊙ (x·Wᵀ + c) + β on a frozen linear as one GEMM: x·(γ ⊙ W)ᵀ + (γ ⊙ c + β), the scaled
    weight made from W and γ as they are (float32) by one product that writes the compute dtype
    (the cast autocast would make of W, with γ in it), and kept for the backward; the bias
    comes made (linear_offsets.py). No pass over the output forward.

    Backward, x's gradient is one GEMM with the kept γ ⊙ W. γ's and β's, Σ g ⊙ (x·Wᵀ + c) and
    Σ g over the tokens, come from one reduction over g and the node's own output y: x·Wᵀ + c
    is (y − β)/γ, and batch norm's backward reduction with mean β and inverse std 1/γ computes
    exactly Σ g ⊙ (y − β)/γ and Σ g in one read of each (where a product and two sums read and
    wrote the activation five times). Only y is kept: the layer's output, which its consumer
    often keeps anyway (a GELU, attention's q, k, v), not a second activation beside it. The
    recovery is exact in exact arithmetic; in floating point it carries y's rounding times
    |β/γ| (a channel whose scale is exactly 0 gets a zero scale gradient, not a NaN). The
    reduction runs in float32 on the parameters themselves (`scale_param`, `shift_param`),
    which receive the gradients in their own dtype (no cast of the gradients back)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_param, shift_param, inverses=None, forward=None):  # noqa: D102
        flat = x.reshape(-1, x.shape[-1])
        scaled = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
        torch.mul(weight, scale_param.unsqueeze(1), out=scaled)
        y = torch.addmm(bias, flat, scaled.t())
        ctx.save_for_backward(y, scaled, scale_param, shift_param)
        ctx.x_shape, ctx.casts, ctx.inverses = x.shape, open_casts(), (inverses, forward)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        y, scaled, scale_param, shift_param = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ scaled).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grads = [None, None]
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            params = (scale_param, shift_param)
            sums = _scale_shift_grads(g, y, *params, ctx.inverses)
            grads = hand_over(ctx.casts, params, sums)
        return grad_x, None, None, *grads, None, None


def _scale_shift_grads(g, y, scale, shift, inverses: tuple[ScaleInverses | None, object]):
    """(Σ g ⊙ (y − β)/γ, Σ g) over the rows of (tokens, channels) g and y, in the parameters'
    dtype (channel_sums.py: one reduction reading each once; 1/γ from the method's
    `ScaleInverses`, made for every site at once, where it has one)."""
    acc = accumulate_dtype(y)
    made, forward = inverses
    inv = made.of(scale, acc, forward) if made is not None else inverse(scale, acc)
    grad_scale, grad_shift = channel_sums(g, y, shift.to(acc), inv)
    return grad_scale.to(scale.dtype), grad_shift.to(shift.dtype)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t summed to a per-channel `shape`: over every leading dim of a channels-last t in one
    call (`sum_to_size` adds a view, an ATen call per site each step); otherwise sum_to_size."""
    if len(shape) == 1 and t.dim() > 1 and t.shape[-1] == shape[0]:
        return t.sum(tuple(range(t.dim() - 1)))
    return t.sum_to_size(shape)


class _NormAffine(torch.autograd.Function):
    """A layer norm's affine under SSF, (w ⊙ γ, b ⊙ γ + β), with γ's gradient dw ⊙ w + db ⊙ b
    formed by one product and one addcmul (autograd's product and addcmul nodes take four
    kernels and an add); w and b get theirs (dw ⊙ γ, db ⊙ γ) where they are trained too."""

    @staticmethod
    def forward(ctx, weight, bias, scale, shift):  # noqa: D102 (torch's interface)
        ctx.save_for_backward(weight, bias, scale)
        return weight * scale, torch.addcmul(shift, bias, scale)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):  # noqa: D102
        weight, bias, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_scale = torch.addcmul(grad_weight * weight, grad_bias, bias) if needs[2] else None
        return (grad_weight * scale if needs[0] else None, grad_bias * scale if needs[1] else None,
                grad_scale, grad_bias)  # fmt: skip


def _channels(module: nn.Module) -> int:
    module = innermost(module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return module.weight.shape[0]
    if is_rms_norm(module):
        return module.weight.shape[0]
    if _is_conv1d(module):
        return module.nf
    raise TargetError(
        "SSF scales nn.Linear, nn.Conv2d, affine nn.LayerNorm, RMSNorm or transformers' Conv1D, "
        f"got {type(module).__name__}"
    )


def _scalable(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Linear | nn.Conv2d)
        or (isinstance(module, nn.LayerNorm) and module.weight is not None)
        or is_rms_norm(module)
        or _is_conv1d(module)
    )


@dataclasses.dataclass(frozen=True)
class SSFConfig(MethodConfig):
    """targets: None for every linear and affine layer norm outside the head, else suffixes or a
    full-match regex; init_std: σ of the N(1, σ) scales and N(0, σ) shifts."""

    targets: str | Sequence[str] | None = None
    init_std: float = 0.02

    def validate(self) -> None:
        check_finite("SSFConfig", "init_std", self.init_std)
        if not 0 <= self.init_std <= 1:  # beyond 1 the scales flip signs and activations explode
            raise ConfigError(f"SSFConfig.init_std must be in [0, 1], got {self.init_std}")


@register_method("ssf")
class SSF(Method):
    config_cls = SSFConfig
    default_lr = 1e-2
    merge_refusal = None

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        skip = untargetable(model)
        if cfg.targets is None:
            names = [  # canonical names: a layer another method wraps is wrapped outside it
                canonical_name(n)
                for n, m in model.named_modules()
                if _scalable(m)
                and not any(n == h or n.startswith(h + ".") for h in skip)
                and not inside_a_method(model, n)
                and not read_directly(model, n)
            ]
        else:
            names = [
                n
                for n in find_targets(model, cfg.targets, types=(nn.Module,))
                if _scalable(model.get_submodule(n))
            ]
        layout = layout_or_none(model)
        norm_offset = layout.norm_offset if layout is not None else 0.0
        inverses, norms, offsets = ScaleInverses(), NormAffines(), LinearOffsets()
        for name in names:
            self.wrap(model, name, lambda base: SSFTuner(base, self.name, cfg.init_std, norm_offset,
                                                         inverses, norms, offsets))  # fmt: skip
