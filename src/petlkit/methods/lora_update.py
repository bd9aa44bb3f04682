"""out + s·(x·Aᵀ)·upᵀ as one autograd node: LoRA's update on the output of the layer it wraps.

The same kernels as `F.linear` and `addmm` under autograd (two GEMMs forward, four backward, the
scaling applied to two of them), with about half the ATen calls: autograd's linear and addmm
nodes add transposes, views and reshapes of every operand each way, and where the GPU waits on
the host (BERT-base at 32 × 128, issue #47) those calls are the step's cost. Gradients by
autograd's formulas; the layer's output passes its gradient through untouched.
"""

from __future__ import annotations

import torch


class LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out, down, up, scaling: float):  # noqa: D102 (torch's interface)
        flat = x.reshape(-1, x.shape[-1])
        h = torch.mm(flat, down.t())
        y = torch.addmm(out.reshape(-1, out.shape[-1]), h, up.t(), alpha=scaling)
        ctx.save_for_backward(flat, h, down, up)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, h, down, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = torch.mm(g, up)
        grad_up = torch.mm(g.t(), h)
        if ctx.scaling != 1.0:
            grad_h.mul_(ctx.scaling)
            grad_up.mul_(ctx.scaling)
        grad_down = torch.mm(grad_h.t(), flat)
        grad_x = torch.mm(grad_h, down).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad, grad_down, grad_up, None
