"""SSF's time and peak with another choice of what its scaled linears keep, counted with
`petlkit cost`'s counter beside today's SSF and the floor (issue #47: SSF's peak goal).

Today every scaled linear keeps its own output y (γ's gradient reads it as (y − β)/γ). The
attention's output projection's output is kept by nothing else, so it costs a bf16 activation a
block over the floor. The variant counted here keeps that linear's input instead (the attention
output, which attention keeps anyway) and makes y again in the backward with one GEMM. It is a
what-if, not a form petlkit runs: the counts show the trade (a lower peak for more time), which
is why SSF keeps its outputs.

    python benchmarks/ssf_keep_input.py        (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse

import torch

from petlkit.cost import cases
from petlkit.cost.fit import fit_ground_truth
from petlkit.methods import ssf
from petlkit.methods.trained_casts import hand_over, open_casts

KEEPS_OUTPUT = ssf._ScaledLinear


class KeepsInput(torch.autograd.Function):
    """`ssf._ScaledLinear`, keeping x where it keeps y: y is made again in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_param, shift_param, inverses=None, forward=None):  # noqa: D102
        flat = x.reshape(-1, x.shape[-1])
        scaled = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
        torch.mul(weight, scale_param.unsqueeze(1), out=scaled)
        y = torch.addmm(bias, flat, scaled.t())
        ctx.save_for_backward(flat, bias, scaled, scale_param, shift_param)
        ctx.x_shape, ctx.casts, ctx.inverses = x.shape, open_casts(), (inverses, forward)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, bias, scaled, scale_param, shift_param = ctx.saved_tensors
        y = torch.addmm(bias, flat, scaled.t())  # made again: one GEMM
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ scaled).view(ctx.x_shape)
        params = (scale_param, shift_param)
        sums = ssf._scale_shift_grads(g, y, *params, ctx.inverses)
        return grad_x, None, None, *hand_over(ctx.casts, params, sums), None, None


class OnProjections:
    """KeepsInput on the attention output projections (square weights whose input is the
    attention's output), today's node on every other linear."""

    @staticmethod
    def apply(x, weight, *rest):
        square = weight.shape[0] == weight.shape[1] == x.shape[-1]
        return (KeepsInput if square else KEEPS_OUTPUT).apply(x, weight, *rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    case = cases.build_case("vit-b16", args.batch, args.size)
    fit = fit_ground_truth()
    rows = {"floor": cases.count(case, cases.FLOOR).totals(),
            "ssf (keeps outputs: today)": cases.count(case, "ssf").totals()}  # fmt: skip
    ssf._ScaledLinear = OnProjections
    try:
        rows["ssf (projection keeps its input)"] = cases.count(case, "ssf").totals()
    finally:
        ssf._ScaledLinear = KEEPS_OUTPUT
    floor_ms, floor_peak = fit.predict_ms(rows["floor"]), rows["floor"]["peak_bytes"]
    print(f"vit-b16, batch {args.batch}, {args.size} px, bf16, counted on fake tensors; "
          f"{fit.describe()}")  # fmt: skip
    print("| form | kernels | predicted ms | ÷ floor | peak GiB | ÷ floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in rows.items():
        ms = fit.predict_ms(t)
        print(f"| {name} | {t['kernels']} | {ms:.2f} | {ms / floor_ms:.3f} | "
              f"{t['peak_bytes'] / 2**30:.2f} | {t['peak_bytes'] / floor_peak:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
