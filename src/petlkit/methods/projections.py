"""A block's separate q, k and v linears, which read one input, computed as one node: one GEMM
over their weights side by side (cast together, as autocast would cast each), each LoRA
member's update added into its columns, and backward one GEMM for the input's gradient where
each linear forms its own and autograd adds them (issue #47: BERT-base waits on the host, and
each ATen call counts). UniPELT's gate group (gate.py) runs it for the block; the linear no
LoRA adapts (the key) is wrapped by `SharedProjection`, which hands out its columns.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from petlkit.methods.base import Tuner
from petlkit.methods.placement import compute_input


class JointProjections(torch.autograd.Function):
    """(x·Wᵢᵀ + bᵢ for each linear i) with `hidden·upᵀ` added to member i's: weight (Σ rows, in)
    and bias (Σ rows) are the linears' side by side, frozen; `sizes` their rows, `members`
    the linear each (hidden, up) pair in `pairs` updates (up: the LoRA layer's B, (1, rows, r)).
    Outputs: one (…, rowsᵢ) view per linear of the GEMM's output, but linear `own`'s, a copy:
    attention keeps the query for its backward, and as a view it would keep the keys' and
    values' columns too (the prefix's concatenation copies those, so they are freed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes: tuple, members: tuple, own: int, *pairs):  # noqa: D102
        flat = x.reshape(-1, x.shape[-1])
        y = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        starts = list(itertools.accumulate(sizes, initial=0))
        hiddens, ups = pairs[0::2], []
        for i, hidden, up in zip(members, hiddens, pairs[1::2], strict=True):
            ups.append(up.view(-1, up.shape[-1]))
            y[:, starts[i] : starts[i + 1]].addmm_(hidden, ups[-1].t())
        ctx.save_for_backward(weight, *hiddens, *ups)
        ctx.x_shape, ctx.sizes, ctx.members = x.shape, sizes, members
        ctx.up_shapes = [up.shape for up in pairs[1::2]]
        outputs = list(y.view(*x.shape[:-1], y.shape[-1]).split(list(sizes), dim=-1))
        outputs[own] = outputs[own].contiguous()
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        weight, *rest = ctx.saved_tensors
        n = len(ctx.members)
        hiddens, ups = rest[:n], rest[n:]
        grads = [torch.zeros(*ctx.x_shape[:-1], rows, dtype=weight.dtype, device=weight.device)
                 if g is None else g for g, rows in zip(grads, ctx.sizes, strict=True)]  # fmt: skip
        g = torch.cat(grads, dim=-1)  # contiguous, whatever layout each gradient came in
        flat = g.view(-1, g.shape[-1])
        grad_x = torch.mm(flat, weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        starts, out = list(itertools.accumulate(ctx.sizes, initial=0)), []
        for i, hidden, up, shape in zip(ctx.members, hiddens, ups, ctx.up_shapes, strict=True):
            part = flat[:, starts[i] : starts[i + 1]]
            out += [torch.mm(part, up), torch.mm(part.t(), hidden).view(shape)]
        return grad_x, None, None, None, None, None, *out


class SharedProjection(Tuner):
    """A linear whose output the block's joint node makes with its siblings' (the key beside
    UniPELT's LoRA query and value): its columns of that node's output where the group made it
    for this input, else the linear itself. Owns no parameters; not an update to merge."""

    def __init__(self, base_layer: nn.Module, owner: str) -> None:
        super().__init__(base_layer, owner)
        self.group = None  # the gate group that makes the joint output (set by UniPELT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group is not None and self.enabled:
            out = group.projection(self, compute_input(x))
            if out is not None:
                return out
        return self.base_layer(x)

    def delta(self) -> tuple[None, None]:
        return None, None
