"""SaS's transform at one site, y = x ⊙ a + b + s·(x·A)·B, as one autograd node.

The same function as `addcmul` followed by `addmm` under autograd, with fewer kernels and
passes in the backward: the gradient reaching x through the scale and through the shared pair is
formed by one GEMM that reads the scaled gradient as its addend (autograd forms both and adds
them), and the scale's and shift's gradients, Σ g ⊙ x and Σ g, come from one reduction reading
g and x once each (channel_sums.py; a product and two sums read the activation five times).
x, a, b, A and B are in one dtype (the site's compute dtype).

The scale's and shift's gradients are float32 sums (float64 for float64 x). They are returned for
`scale_wide` and `shift_wide` when given (the same rows in float32 or wider, which SaS passes from
before its cast to the compute dtype, so no gradient is cast down and back up), else for `scale`
and `shift` in their dtype. `unit`, (zeros, ones) of the width in that float dtype, saves making
them per site.
"""

from __future__ import annotations

import torch

from petlkit.methods.channel_sums import accumulate_dtype, channel_sums


class SiteTransform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, scale, shift, down, up, alpha: float,  # noqa: D102 (torch's interface)
                scale_wide=None, shift_wide=None, unit=None):  # fmt: skip
        low_rank = flat @ down
        out = torch.addmm(torch.addcmul(shift, flat, scale), low_rank, up, alpha=alpha)
        ctx.save_for_backward(flat, scale, low_rank, down, up)
        ctx.alpha, ctx.unit, ctx.wide = alpha, unit, scale_wide is not None
        ctx.dtypes = (scale.dtype, shift.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, scale, low_rank, down, up = ctx.saved_tensors
        alpha, needs = ctx.alpha, ctx.needs_input_grad
        grad_up = low_rank.t() @ grad
        grad_low = grad @ up.t()
        if alpha != 1.0:
            grad_up, grad_low = grad_up * alpha, grad_low * alpha
        grad_down = flat.t() @ grad_low
        grad_flat = None
        if needs[0]:
            grad_flat = torch.addmm(grad * scale, grad_low, down.t())
        sums = [None, None]
        if any(needs[6:8] if ctx.wide else needs[1:3]):
            zeros, ones = ctx.unit if ctx.unit is not None else unit_stats(flat)
            sums = list(channel_sums(grad, flat, zeros, ones))
            if not ctx.wide:
                sums = [s.to(dtype) for s, dtype in zip(sums, ctx.dtypes, strict=True)]
        if ctx.wide:
            return grad_flat, None, None, grad_down, grad_up, None, *sums, None
        return grad_flat, *sums, grad_down, grad_up, None, None, None, None


def unit_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeros, ones) of x's width in the dtype `channel_sums` reads: Σ g ⊙ x and Σ g."""
    acc, width = accumulate_dtype(x), x.shape[-1]
    return (torch.zeros(width, dtype=acc, device=x.device),
            torch.ones(width, dtype=acc, device=x.device))  # fmt: skip
