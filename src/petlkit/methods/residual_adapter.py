"""y + W_up·relu(W_down·y + b_down) + b_up as one autograd node (a bottleneck adapter added to the
tensor it reads: pre-norm Pfeiffer on the residual stream, Houlsby on a sublayer's output).

The same function and gradients as the adapter's modules under autograd, with fewer kernels and
fewer passes over the activation (which on a pre-norm ViT is the float32 residual stream):
the down-projection's bias and ReLU run in the GEMM's epilogue (`_addmm_activation`, one kernel
on CUDA), and the gradient reaching y through the adapter is added to the one through the
residual by a single mixed-dtype add (autograd casts it to float32 first and adds again). Each
gradient is formed with autograd's own formulas, so it rounds as autograd rounds.
"""

from __future__ import annotations

import torch


class ResidualBottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dtype, w_down, b_down, w_up, b_up):  # noqa: D102 (torch's interface)
        low = (y if y.dtype == dtype else y.to(dtype)).reshape(-1, y.shape[-1])
        hidden = torch._addmm_activation(b_down, low, w_down.t())  # relu in the epilogue
        update = torch.addmm(b_up, hidden, w_up.t())
        ctx.save_for_backward(low, hidden, w_down, w_up)
        ctx.dtype = dtype
        return y + update.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        low, hidden, w_down, w_up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g = g if g.dtype == ctx.dtype else g.to(ctx.dtype)
        grad_w_up = (hidden.t() @ g).t()
        grad_b_up = g.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(g @ w_up, hidden, 0)
        grad_w_down = (low.t() @ grad_hidden).t()
        grad_b_down = grad_hidden.sum(0)
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = grad + (grad_hidden @ w_down).view(grad.shape)
        return grad_y, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up
