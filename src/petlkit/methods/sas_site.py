"""SaS's transform at one site, y = x ⊙ a + b + s·(x·A)·B, as one autograd node.

The same function as `addcmul` followed by `addmm` under autograd, with fewer kernels and
passes in the backward: the gradient reaching x through the scale and through the shared pair is
formed by one GEMM that reads the scaled gradient as its addend (autograd forms both and adds
them), and the scale's gradient is one product and one sum (autograd's `addcmul` backward also
multiplies x by its unit `value`, a pass over the activation). x, a, b, A and B are in one dtype
(the site's compute dtype); gradients are returned in it.
"""

from __future__ import annotations

import torch


class SiteTransform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, scale, shift, down, up, alpha: float):  # noqa: D102 (torch's interface)
        low_rank = flat @ down
        out = torch.addmm(torch.addcmul(shift, flat, scale), low_rank, up, alpha=alpha)
        ctx.save_for_backward(flat, scale, low_rank, down, up)
        ctx.alpha = alpha
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, scale, low_rank, down, up = ctx.saved_tensors
        alpha = ctx.alpha
        grad_up = low_rank.t() @ grad
        grad_low = grad @ up.t()
        if alpha != 1.0:
            grad_up, grad_low = grad_up * alpha, grad_low * alpha
        grad_down = flat.t() @ grad_low
        grad_flat = None
        if ctx.needs_input_grad[0]:
            grad_flat = torch.addmm(grad * scale, grad_low, down.t())
        grad_scale = (grad * flat).sum(0) if ctx.needs_input_grad[1] else None
        grad_shift = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_flat, grad_scale, grad_shift, grad_down, grad_up, None
