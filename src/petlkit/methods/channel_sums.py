"""Per-channel gradient sums over the tokens in one read of each operand.

A per-channel scale and shift (SSF, SaS's layer-specific module) need Σ g ⊙ u and Σ g over the
rows of (tokens, channels) tensors. In eager mode that is a product and two sums: the
activation read five times and written once. Batch norm's backward reduction computes exactly
Σ g ⊙ (u − m) ⊙ v and Σ g for per-channel m and v, reading g and u once each, on every device
(`torch.ops.aten.native_batch_norm_backward` with only the weight's and bias's gradients asked
for). Its statistics (and the weight standing in, which fixes the results' dtype) are float32,
or float64 for float64 tensors: CUDA's kernel for a contiguous 2-D input reads them in that
dtype whatever u's, and CPU's takes that mix too.
"""

from __future__ import annotations

import torch


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype batch norm's reduction reads its statistics in for `t`."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def channel_sums(
    g: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ g ⊙ (u − mean) ⊙ inverse, Σ g) over the rows of 2-D g and u, in the statistics'
    dtype (`accumulate_dtype(u)`; `mean` and `inverse` must be in it)."""
    _, weighted, plain = torch.ops.aten.native_batch_norm_backward(
        g.contiguous(), u.contiguous(), inverse, None, None, mean, inverse, True, 0.0,
        [False, True, True],
    )  # fmt: skip
    return weighted, plain
