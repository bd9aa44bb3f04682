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
        shape = kept.shape
        g = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        flat = g.reshape(-1, shape[-1])
        if ctx.causal:
            update = torch.addmm(b_up, hidden, w_up.t()).view(shape)
            grad_update = (g * gate).reshape(-1, shape[-1])
            grad_s = (g * update).sum(-1, keepdim=True)
            grad_w_up, grad_b_up = grad_update.t() @ hidden, grad_update.sum(0)
            grad_hidden = grad_update @ w_up
        else:  # one gate per example: its products with g are formed on rank-r tensors
            update = None
            grad_s, grad_hidden, grad_w_up, grad_b_up = _per_example(g, flat, gate, hidden,
                                                                     w_up, b_up)  # fmt: skip
        grad_s = torch.ops.aten.sigmoid_backward(grad_s.expand(*shape[:-1], 1).reshape(-1, 1), s)
        grad_hidden = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)
        grad_both = torch.cat([grad_hidden, grad_s], dim=1)
        grad_w_both, grad_b_both = grad_both.t() @ _input(ctx, kept, hidden, gate, w_up, b_up,
                                                          update), grad_both.sum(0)  # fmt: skip
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = grad + (grad_both @ w_both).view(grad.shape)
        rank = ctx.rank
        return (grad_y, None, None, grad_w_both[:rank], grad_b_both[:rank], grad_w_up, grad_b_up,
                grad_w_both[rank:], grad_b_both[rank:])  # fmt: skip


def _per_example(g, flat, gate, hidden, w_up, b_up):
    """With G one number per example, the gate's gradient Σ_t,d g ⊙ (h·W_upᵀ + b_up) is
    Σ_t (g·W_up) ⊙ h + (Σ_t g)·b_up, and the up-projection's gradients take G on h: the
    only passes over g are the GEMM and one sum per example, where forming g ⊙ G and g ⊙ A(y)
    reads and writes g's size three times more."""
    batch = g.shape[0]
    positions = flat.shape[0] // batch
    g_up = (flat @ w_up).view(batch, positions, -1)  # (batch, positions, r)
    h = hidden.view(batch, positions, -1)
    per_example = flat.view(batch, positions, -1).sum(1)  # (batch, width)
    dots = torch.bmm(g_up.view(batch, 1, -1), h.view(batch, -1, 1)).view(batch)
    # (dots + per_example·b_up) / positions: the mean's gradient, in one kernel
    grad_gate = torch.addmv(dots, per_example, b_up, beta=1 / positions, alpha=1 / positions)
    grad_s = grad_gate.view(batch, *([1] * (g.dim() - 1)))
    gate = gate.view(batch, 1, 1)
    gate_h = (h * gate).reshape(-1, h.shape[-1])
    grad_hidden = (g_up * gate).reshape(-1, h.shape[-1])
    return grad_s, grad_hidden, flat.t() @ gate_h, gate.reshape(-1) @ per_example


def _input(ctx, kept, hidden, gate, w_up, b_up, update):
    """The adapter's input in the compute dtype, (tokens, width): kept, or recovered as
    out − G·A(y) from the output (A(y) made again: a rank-r GEMM), to float32 rounding."""
    shape = kept.shape
    if not ctx.recover:
        return kept.reshape(-1, shape[-1])
    if update is None:
        update = torch.addmm(b_up, hidden, w_up.t()).view(shape)
    low = torch.empty(shape, dtype=ctx.dtype, device=kept.device)
    torch.addcmul(kept, update, gate, value=-1, out=low)
    return low.reshape(-1, shape[-1])


def _no_autocast(x: torch.Tensor):
    """Autocast off for x's device, where it is on (a mixed-dtype op then runs as one kernel)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
