"""y + W_up·relu(W_down·x + b_down) + b_up as one autograd node: a bottleneck adapter added to the
tensor it reads (x = y: pre-norm Pfeiffer on the residual stream, Houlsby on a sublayer's output)
or to another one (x = LN(y): Pfeiffer on a post-norm encoder, whose output goes back into y
before the layer norm runs again).

The same function and gradients as the adapter's modules under autograd, with fewer kernels and
fewer passes over the activation (which on a pre-norm ViT is the float32 residual stream):
the down-projection's bias and ReLU run in the GEMM's epilogue (`_addmm_activation`, one kernel
on CUDA), and the gradient reaching y through the adapter is added to the one through the
residual by a single mixed-dtype add (autograd casts it to float32 first and adds again); with a
separate x, y's gradient passes through untouched.
Weight gradients are formed in the weights' own (contiguous) layout, so the foreach copy that
casts them back takes its fast path and AccumulateGrad keeps them without a copy.
"""

from __future__ import annotations

import contextlib

import torch

from petlkit.methods.trained_casts import side_by_side


class ResidualBottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, dtype, w_down, b_down, w_up, b_up):  # noqa: D102 (torch's interface)
        source = y if x is None else x  # the adapter's input: y itself, or x
        low = (source if source.dtype == dtype else source.to(dtype)).reshape(-1, y.shape[-1])
        hidden = torch._addmm_activation(b_down, low, w_down.t())  # relu in the epilogue
        update = torch.addmm(b_up, hidden, w_up.t())
        ctx.save_for_backward(low, hidden, w_down, w_up)
        ctx.dtype, ctx.separate = dtype, x is not None
        return y + update.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        low, hidden, w_down, w_up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g = g if g.dtype == ctx.dtype else g.to(ctx.dtype)
        grad_w_up = g.t() @ hidden  # contiguous, as the parameter is (see trained_casts._CastAll)
        grad_b_up = g.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(g @ w_up, hidden, 0)
        grad_w_down = grad_hidden.t() @ low
        grad_b_down = grad_hidden.sum(0)
        grad_y, grad_x = _input_grads(ctx, grad, grad_hidden, w_down)
        return grad_y, grad_x, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up


class GatedResidualBottleneck(torch.autograd.Function):
    """y + G(x)·A(x) (x = y by default) with UniPELT's gate G (gate.py: the mean over positions
    of σ(w_G·x + b_G), or per position on causal models). The gate's logit is one more output
    column of the down-projection's GEMM, and its gradient one more column of the GEMM that
    returns x's gradient, where alone it costs a GEMM, an outer product and an add of y's size.
    It keeps the adapter's input in the compute dtype, as the adapter's own GEMM would keep it:
    the (tokens, width) matrix the down-projection read (a view of y or x where no cast was
    needed). The adapter's output A(x), which the gate's gradient reads, is made again in the
    backward on causal models (a rank-r GEMM); with one gate per example the backward needs
    only rank-r products (`_per_example`)."""

    @staticmethod
    def forward(ctx, y, x, dtype, causal, w_down, b_down, w_up, b_up, w_gate, b_gate):  # noqa: D102
        width, rank = y.shape[-1], w_down.shape[0]
        source = y if x is None else x
        low = (source if source.dtype == dtype else source.to(dtype)).reshape(-1, width)
        w_both, b_both = side_by_side([w_down, w_gate]), side_by_side([b_down, b_gate])
        both = torch.addmm(b_both, low, w_both.t())
        hidden, logit = both.split([rank, both.shape[1] - rank], dim=1)
        hidden, s = torch.relu(hidden), torch.sigmoid(logit)
        positions = s.view(y.shape[0], -1, 1)
        gate = positions if causal else positions.mean(1, keepdim=True)
        update = torch.addmm(b_up, hidden, w_up.t()).view(y.shape)
        with _no_autocast(y):  # CUDA autocast would cast A(y) to float32 first: one pass more
            out = torch.addcmul(y, update, gate)
        ctx.save_for_backward(low, hidden, positions, gate, w_both, w_up, b_up)  # s per example
        ctx.dtype, ctx.causal, ctx.rank = dtype, causal, rank
        ctx.separate, ctx.shape = x is not None, y.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        low, hidden, s, gate, w_both, w_up, b_up = ctx.saved_tensors  # s: (batch, positions, 1)
        shape = ctx.shape
        g = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        flat = g.reshape(-1, shape[-1])
        if ctx.causal:
            update = torch.addmm(b_up, hidden, w_up.t()).view(shape)
            grad_update = (g * gate).reshape(-1, shape[-1])
            grad_s = (g * update).sum(-1, keepdim=True)
            grad_w_up, grad_b_up = grad_update.t() @ hidden, grad_update.sum(0)
            grad_hidden = grad_update @ w_up
        else:  # one gate per example: its products with g are formed on rank-r tensors
            grad_s, grad_hidden, grad_w_up, grad_b_up = _per_example(g, flat, gate, hidden,
                                                                     w_up, b_up)  # fmt: skip
        batch = shape[0]  # the gate's gradient broadcast over the positions it spans
        grad_s = grad_s if grad_s.dim() == 3 else grad_s.view(batch, -1, 1)
        grad_s = torch.ops.aten.sigmoid_backward(grad_s, s).view(-1, 1)
        grad_hidden = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)
        grad_both = torch.cat([grad_hidden, grad_s], dim=1)
        grad_w_both, grad_b_both = grad_both.t() @ low, grad_both.sum(0)
        grad_y, grad_x = _input_grads(ctx, grad, grad_both, w_both)
        sizes = [ctx.rank, grad_both.shape[1] - ctx.rank]
        grad_w_down, grad_w_gate = grad_w_both.split(sizes)
        grad_b_down, grad_b_gate = grad_b_both.split(sizes)
        return (grad_y, grad_x, None, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up,
                grad_w_gate, grad_b_gate)  # fmt: skip


def _input_grads(ctx, grad, grad_first, w_first):
    """(y's gradient, x's): the adapter's input gradient is added to y's where x is y, else it
    is x's, and y's passes through."""
    needs_y, needs_x = ctx.needs_input_grad[:2]
    through = None
    if needs_y and not ctx.separate or needs_x:
        through = (grad_first @ w_first).view(grad.shape)
    if ctx.separate:
        return (grad if needs_y else None), through
    return (grad + through if needs_y else None), None


def _per_example(g, flat, gate, hidden, w_up, b_up):
    """With G one number per example, the gate's gradient Σ_t,d g ⊙ (h·W_upᵀ + b_up) is
    Σ_t (g·W_up) ⊙ h + (Σ_t g)·b_up, and the up-projection's gradients take G on h: the
    only passes over g are the GEMM and one sum per example, where forming g ⊙ G and g ⊙ A(y)
    reads and writes g's size three times more. gate: (batch, 1, 1)."""
    batch = g.shape[0]
    positions = flat.shape[0] // batch
    g_up = flat @ w_up  # (tokens, r)
    per_example = (g if g.dim() == 3 else flat.view(batch, positions, -1)).sum(1)  # (batch, width)
    dots = torch.bmm(g_up.view(batch, 1, -1), hidden.view(batch, -1, 1)).view(batch)
    # (dots + per_example·b_up) / positions: the mean's gradient, in one kernel
    grad_gate = torch.addmv(dots, per_example, b_up, beta=1 / positions, alpha=1 / positions)
    rank = hidden.shape[-1]
    gate_h = (hidden.view(batch, positions, rank) * gate).view(-1, rank)
    grad_hidden = (g_up.view(batch, positions, rank) * gate).view(-1, rank)
    grad_b_up = torch.mv(per_example.t(), gate.view(batch))
    return grad_gate.view(batch, 1, 1), grad_hidden, flat.t() @ gate_h, grad_b_up


def _no_autocast(x: torch.Tensor):
    """Autocast off for x's device, where it is on (a mixed-dtype op then runs as one kernel)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
