"""SaS's transform at one site, y = x ⊙ a + b + s·(x·A)·B, as one autograd node.

Written as y = u + [s·(u·A'), 1]·[B; b] with u = x ⊙ a and A' = diag(1/a)·A (u·A' is x·A):
  forward, u is the one pass over x (the cast to the compute dtype that the linears reading the
  site would make anyway, with the scale in it), then two GEMMs, the shift riding on the second
  as one more row of B (the first GEMM's bias gives its column of ones);
  backward, the gradient reaching u through the shared pair is u's gradient's addend in one GEMM,
  and x's gradient is that times a (the cast back to x's dtype, with the scale in it).
So the site adds no pass over the activation of its own either way: the scale's and shift's
gradients, Σ g ⊙ x and Σ g, come from the GEMM forming B's gradient (its last row) and one
reduction reading g and u once (channel_sums.py, x recovered as u ⊙ 1/a).

`site_rows` makes the per-block inputs for every block at once (a few kernels per site kind and
forward, not per block). A scale of exactly 0 computes as the square root of the compute dtype's
smallest normal number (1e-19 in bfloat16 or float32, 0.008 in float16): 1/a must be finite.
"""

from __future__ import annotations

import torch

from petlkit.methods.channel_sums import accumulate_dtype, channel_sums


class SiteTransform(torch.autograd.Function):
    """x (tokens, width) in any float dtype → y in the compute dtype (that of `down`).

    scale: a (width,) in the accumulate dtype, which receives Σ g ⊙ x; eff and inv: a (with 0
    replaced) and 1/a, not trained; down: [s·A'; 0] (width, r + 1); up: [B; b] (r + 1, width);
    ones: the unit column's bias (r + 1,); zeros: (width,) in the accumulate dtype."""

    @staticmethod
    def forward(ctx, x, scale, eff, inv, down, up, ones, zeros):  # noqa: D102 (torch's interface)
        scaled = torch.empty(x.shape, dtype=down.dtype, device=x.device)
        torch.mul(x, eff, out=scaled)  # u = x ⊙ a, in the compute dtype
        low = torch.addmm(ones, scaled, down)  # [s·(x·A), 1]
        ctx.save_for_backward(scaled, low, eff, inv, down, up, zeros)
        ctx.x_dtype = x.dtype
        return torch.addmm(scaled, low, up)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        scaled, low, eff, inv, down, up, zeros = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_low = grad @ up.t()
        grad_up = low.t() @ grad
        grad_down = scaled.t() @ grad_low
        grad_x = grad_scale = None
        if needs[0]:
            grad_scaled = torch.addmm(grad, grad_low, down.t())
            grad_x = torch.empty(grad.shape, dtype=ctx.x_dtype, device=grad.device)
            torch.mul(grad_scaled, eff, out=grad_x)
        if needs[1]:
            grad_scale = channel_sums(grad, scaled, zeros, inv)[0]
        return grad_x, grad_scale, None, None, grad_down, grad_up, None, None


class _ScaledDowns(torch.autograd.Function):
    """[s·diag(1/a_l)·A, 0] for every block l: (depth, width, r + 1) in `dtype`, from A in its
    own dtype (one rounding); A's gradient Σ_l s·(1/a_l) ⊙ grad_l."""

    @staticmethod
    def forward(ctx, down, inv, alpha: float, dtype: torch.dtype):  # noqa: D102
        rank = down.shape[1]
        out = torch.empty(*inv.shape, rank + 1, dtype=dtype, device=down.device)
        body = out[..., :rank]
        torch.mul(down, inv.unsqueeze(-1), out=body)
        if alpha != 1.0:
            body.mul_(alpha)
        out[..., rank].zero_()
        # not saved_tensors: the rows are made once per forward, inside whichever block reads
        # them first, and activation checkpointing's recomputation of that block must save
        # what its first run saved (inv is made without grad and never changed)
        ctx.inv, ctx.alpha, ctx.rank, ctx.dtype = inv, alpha, rank, down.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_down = (grad[..., : ctx.rank] * ctx.inv.unsqueeze(-1)).sum(0, dtype=ctx.dtype)
        if ctx.alpha != 1.0:
            grad_down.mul_(ctx.alpha)
        return grad_down, None, None, None


def site_rows(scale, shift, down, up, alpha: float, dtype: torch.dtype) -> list[tuple]:
    """SiteTransform's inputs for every block: [(scale_l, eff_l, inv_l, down_l, up_l)].

    scale: (depth, width) in the accumulate dtype; shift: (depth, width) and up: (r, width) in
    the compute dtype `dtype`; down: (width, r) in its own dtype. One kernel or two each, for
    all blocks; the blocks' gradients meet in one stack each."""
    depth = scale.shape[0]
    with torch.no_grad():
        tiny = torch.finfo(dtype).tiny ** 0.5
        eff = torch.where(scale == 0, tiny, scale)
        inv = eff.reciprocal()
    downs = _ScaledDowns.apply(down, inv, alpha, dtype)
    ups = torch.cat([up.expand(depth, *up.shape), shift.unsqueeze(1)], dim=1)
    return list(zip(scale.unbind(0), eff.unbind(0), inv.unbind(0), downs.unbind(0),
                    ups.unbind(0), strict=True))  # fmt: skip


def site_constants(rank: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(ones, zeros) every site reads: the bias (r + 1,) of the unit column in `dtype`, and the
    zero mean (width,) of the scale's reduction in the accumulate dtype."""
    ones = torch.zeros(rank + 1, dtype=dtype, device=device)
    ones[rank:].fill_(1)
    zeros = torch.zeros(width, dtype=accumulate_dtype(ones), device=device)
    return ones, zeros
