"""out + s·(x·Aᵀ)·upᵀ as one autograd node: LoRA's update on the output of the layer it wraps.

The same kernels as `F.linear` and `addmm` under autograd (two GEMMs forward, four backward, the
scaling applied to two of them), with about half the ATen calls: autograd's linear and addmm
nodes add transposes, views and reshapes of every operand each way, and where the GPU waits on
the host (BERT-base at 32 × 128, issue #47) those calls are the step's cost. Gradients by
autograd's formulas; the layer's output passes its gradient through, as the contiguous copy
the update's GEMMs read when it arrives strided (one copy for both).
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
        return grad_x, _same_layout(grad, g), grad_down, grad_up, None


class GatedLoRAUpdate(torch.autograd.Function):
    """out + ((x·Aᵀ) ⊙ G)·Bᵀ as one node: UniPELT's gated LoRA, the gate G (batch, positions or
    1, parts, 1) scaling each part's rank block per example (or per position on a decoder).
    Two GEMMs and a rank-sized product forward; backward four GEMMs, the gate's gradient as one
    product and one sum over rank-sized tensors, without autograd's views, transposes and
    broadcast reductions of each operand (issue #47: BERT-base waits on the host)."""

    @staticmethod
    def forward(ctx, x, out, down, up, gate):  # noqa: D102 (torch's interface)
        flat = x.reshape(-1, x.shape[-1])
        h = torch.mm(flat, down.t())
        blocks = (*x.shape[:-1], gate.shape[-2], -1)  # (batch, tokens, parts, r)
        hg = (h.view(blocks) * gate).view(h.shape)
        y = torch.addmm(out.reshape(-1, out.shape[-1]), hg, up.t())
        ctx.save_for_backward(flat, h, hg, down, up, gate)
        ctx.x_shape, ctx.blocks = x.shape, blocks
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, h, hg, down, up, gate = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_hg = torch.mm(g, up).view(ctx.blocks)
        grad_up = torch.mm(g.t(), hg)
        grad_h = (grad_hg * gate).view(h.shape)
        summed = (3,) if gate.shape[1] > 1 else (1, 3)  # over rank, and positions a gate spans
        grad_gate = (grad_hg * h.view(ctx.blocks)).sum(summed, keepdim=True)
        grad_down = torch.mm(grad_h.t(), flat)
        grad_x = torch.mm(grad_h, down).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, _same_layout(grad, g), grad_down, grad_up, grad_gate


class LoRAUp(torch.autograd.Function):
    """out + hidden·upᵀ as one node: a LoRA member's update from its gated hidden, made for the
    whole block by `grouped_down.GroupedDown`. One GEMM forward, two backward."""

    @staticmethod
    def forward(ctx, out, hidden, up):  # noqa: D102 (torch's interface)
        y = torch.addmm(out.reshape(-1, out.shape[-1]), hidden, up.t())
        ctx.save_for_backward(hidden, up)
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        hidden, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return _same_layout(grad, g), torch.mm(g, up), torch.mm(g.t(), hidden)


class LinearLoRAUp(torch.autograd.Function):
    """x·Wᵀ + b + hidden·upᵀ as one node: a plain linear layer and a LoRA member's update from
    its gated hidden (`LoRAUp` on the layer's output), so that the layer's output is never
    reshaped between the two: two GEMMs forward, the second adding into the first's output;
    backward the input's gradient, the hidden's and up's from one 2-D view of the output's
    gradient (autograd's linear and addmm nodes and `LoRAUp` each reshaped and transposed it).
    W and b are used as given (cast by the caller, as autocast would cast them); their
    gradients are formed only where they are trained.

    `spaced` (start, step): `up` is every part's B, (parts, rows, r), and part i's output
    columns are rows wide from start + i·step (the q and v of a fused q|k|v). The update is then
    one GEMM per part into its columns of the output, and backward one batched GEMM each for the
    hidden's and up's gradients, read and written as strided views: no zero-padded
    (out, parts·r) matrix, formed (a fill and a copy) and read by GEMMs three times the size, and
    no stack of its gradient's blocks (two kernels a block fewer on ViT, issue #47). Not one
    batched GEMM forward: CPU's oneDNN cannot write into parts whose batch stride is below the
    row stride (q, v with k between), and on failing it turns itself off for the process."""

    @staticmethod
    def forward(ctx, x, weight, bias, hidden, up, spaced=None):  # noqa: D102 (torch's interface)
        flat = x.reshape(-1, x.shape[-1])
        y = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        if spaced is None:
            y.addmm_(hidden, up.t())
        else:
            for out, h, b in zip(_columns(y, spaced, up.shape), _by_part(hidden, up.shape), up,
                                 strict=True):  # fmt: skip
                out.addmm_(h, b.t())
        ctx.save_for_backward(flat if weight.requires_grad else None, weight, hidden, up)
        ctx.x_shape, ctx.spaced = x.shape, spaced
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, weight, hidden, up = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.mm(g, weight).view(ctx.x_shape) if needs_x else None
        grad_w = torch.mm(g.t(), flat) if needs_w else None
        grad_b = g.sum(0) if needs_b else None
        if ctx.spaced is None:
            return grad_x, grad_w, grad_b, torch.mm(g, up), torch.mm(g.t(), hidden), None
        parts = _columns(g, ctx.spaced, up.shape)  # (parts, tokens, rows)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        torch.bmm(parts, up, out=_by_part(grad_hidden, up.shape))  # written in hidden's layout
        grad_up = torch.bmm(parts.transpose(1, 2), _by_part(hidden, up.shape))
        return grad_x, grad_w, grad_b, grad_hidden, grad_up, None


def _columns(out: torch.Tensor, spaced: tuple[int, int], parts: torch.Size) -> torch.Tensor:
    """The 2-D `out`'s columns of each part as one (parts, tokens, rows) view."""
    (start, step), (n, rows, _) = spaced, parts
    row, col = out.stride()
    return out.as_strided((n, out.shape[0], rows), (step * col, row, col),
                          out.storage_offset() + start * col)  # fmt: skip


def _by_part(hidden: torch.Tensor, parts: torch.Size) -> torch.Tensor:
    """The (tokens, parts·r) `hidden` as a (parts, tokens, r) view."""
    n, _, r = parts
    return hidden.view(hidden.shape[0], n, r).transpose(0, 1)


def _same_layout(grad: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The layer output's gradient, passed through: the contiguous copy `flat` the GEMMs read
    where `grad` is not contiguous (attention's gradient of q or v arrives transposed), so the
    wrapped layer's backward reads it without copying it once more."""
    return grad if grad.is_contiguous() else flat.view(grad.shape)
