"""y + W_up·relu(W_down·y + b_down) + b_up as one autograd node (a bottleneck adapter added to the
tensor it reads: pre-norm Pfeiffer on the residual stream, Houlsby on a sublayer's output).

The same function and gradients as the adapter's modules under autograd, with fewer kernels and
fewer passes over the activation (which on a pre-norm ViT is the float32 residual stream):
the down-projection's bias and ReLU run in the GEMM's epilogue (`_addmm_activation`, one kernel
on CUDA), and the gradient reaching y through the adapter is added to the one through the
residual by a single mixed-dtype add (autograd casts it to float32 first and adds again).
Weight gradients are formed in the weights' own (contiguous) layout, so the foreach copy that
casts them back takes its fast path and AccumulateGrad keeps them without a copy.
"""

from __future__ import annotations

import contextlib

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
        grad_w_up = g.t() @ hidden  # contiguous, as the parameter is (see placement._CastAll)
        grad_b_up = g.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(g @ w_up, hidden, 0)
        grad_w_down = grad_hidden.t() @ low
        grad_b_down = grad_hidden.sum(0)
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = grad + (grad_hidden @ w_down).view(grad.shape)
        return grad_y, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up


class GatedResidualBottleneck(torch.autograd.Function):
    """y + G(y)·A(y) with UniPELT's gate G (gate.py: the mean over positions of σ(w_G·y + b_G),
    or per position on causal models). The gate's logit is one more output column of the
    down-projection's GEMM, and its gradient one more column of the GEMM that returns y's
    gradient, where alone it costs a GEMM, an outer product and an add of y's size. Nothing of
    y's size is kept beyond what the model keeps: the adapter's output A(y), which the gate's
    gradient reads, is made again in the backward (a rank-r GEMM), and a float32 y (a pre-norm
    residual stream) is recovered as out − G·A(y) from the output, which the next layer norm
    keeps, to float32 rounding, then cast; UniPELT's peak memory is bounded by what its parts
    keep per block."""

    @staticmethod
    def forward(ctx, y, dtype, causal, w_down, b_down, w_up, b_up, w_gate, b_gate):  # noqa: D102
        width, rank = y.shape[-1], w_down.shape[0]
        low = (y if y.dtype == dtype else y.to(dtype)).reshape(-1, width)
        w_both, b_both = torch.cat([w_down, w_gate]), torch.cat([b_down, b_gate])
        both = torch.addmm(b_both, low, w_both.t())
        hidden, s = torch.relu(both[:, :rank]), torch.sigmoid(both[:, rank:])
        positions = s.view(y.shape[0], -1, 1)
        gate = positions if causal else positions.mean(1, keepdim=True)
        update = torch.addmm(b_up, hidden, w_up.t()).view(y.shape)
        with _no_autocast(y):  # CUDA autocast would cast A(y) to float32 first: one pass more
            out = torch.addcmul(y, update, gate)
        kept = y if y.dtype == dtype else out  # the input itself, or what recovers it
        ctx.save_for_backward(kept, hidden, s, gate, w_both, w_up, b_up)
        ctx.dtype, ctx.causal, ctx.rank, ctx.recover = dtype, causal, rank, kept is out
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        kept, hidden, s, gate, w_both, w_up, b_up = ctx.saved_tensors
        rank, shape = ctx.rank, kept.shape
        update = torch.addmm(b_up, hidden, w_up.t()).view(shape)
        if ctx.recover:  # y = out − G·A(y) in float32, written in the compute dtype: one pass
            low = torch.empty(shape, dtype=ctx.dtype, device=kept.device)
            torch.addcmul(kept, update, gate, value=-1, out=low)
        else:
            low = kept
        low = low.reshape(-1, shape[-1])
        g = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        grad_update = (g * gate).reshape(-1, shape[-1])
        if ctx.causal:
            grad_s = (g * update).sum(-1, keepdim=True)
        else:
            grad_s = (g * update).sum((1, 2), keepdim=True) / shape[1]
        grad_s = torch.ops.aten.sigmoid_backward(grad_s.expand(*shape[:-1], 1).reshape(-1, 1), s)
        grad_w_up, grad_b_up = grad_update.t() @ hidden, grad_update.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(grad_update @ w_up, hidden, 0)
        grad_both = torch.cat([grad_hidden, grad_s], dim=1)
        grad_w_both, grad_b_both = grad_both.t() @ low, grad_both.sum(0)
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = grad + (grad_both @ w_both).view(grad.shape)
        return (grad_y, None, None, grad_w_both[:rank], grad_b_both[:rank], grad_w_up, grad_b_up,
                grad_w_both[rank:], grad_b_both[rank:])  # fmt: skip


def _no_autocast(x: torch.Tensor):
    """Autocast off for x's device, where it is on (a mixed-dtype op then runs as one kernel)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
