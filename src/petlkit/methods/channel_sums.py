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

from petlkit.methods.base import StartsEmpty


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


LARGEST_INVERSE = 1e30  # 1/γ for a scale of exactly 0: large and finite (γ's sum is then 0·1e30)


def inverse(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/scale in `dtype`, ± LARGEST_INVERSE where the scale is ± 0 (no inf, hence no NaN)."""
    return scale.to(dtype).reciprocal().clamp_(-LARGEST_INVERSE, LARGEST_INVERSE)


class ScaleInverses(StartsEmpty):
    """1/γ of every scale a method's nodes read, made for all of them by one foreach launch per
    op when a backward first asks for one, where each alone costs two kernels per site and
    step. Made once per forward (`trained_casts.forward_token`: values written through `.data`
    between steps are seen) and again if a scale changed in place since; the last few forwards
    are kept (micro-batches backward together). Scales are noted as forwards read them
    (weakly: a scale that is gone is forgotten). One process only: FSDP frees and refills
    gathered parameters between uses (the caller passes None there). Copies and pickles start
    empty."""

    KEPT_FORWARDS = 4

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._read = WeakIdKeyDictionary()  # every scale read so far
        self._made: dict[object, object] = {}  # forward token → {scale: (version, 1/scale)}

    def read(self, scale: torch.Tensor) -> None:
        self._read[scale] = None

    def of(self, scale: torch.Tensor, dtype: torch.dtype, forward: object) -> torch.Tensor:
        """1/scale in `dtype` (as `inverse`) for the backward of the forward `forward`."""
        made = self._made.get(forward)
        entry = None if made is None else made.get(scale)
        if entry is None or entry[0] != scale._version:
            entry = self._make(scale, forward)
        return entry[1] if entry[1].dtype == dtype else entry[1].to(dtype)

    def _make(self, scale: torch.Tensor, forward: object) -> tuple:
        from torch.utils.weak import WeakIdKeyDictionary

        self.read(scale)
        like = [s for s in self._read if (s.device, s.dtype) == (scale.device, scale.dtype)]
        with torch.no_grad():
            made = torch._foreach_reciprocal(like)
            torch._foreach_clamp_min_(made, -LARGEST_INVERSE)
            torch._foreach_clamp_max_(made, LARGEST_INVERSE)
        table = self._made.pop(forward, None) or WeakIdKeyDictionary()
        for s, m in zip(like, made, strict=True):
            table[s] = (s._version, m)
        self._made[forward] = table  # the newest last; the oldest forgotten
        while len(self._made) > self.KEPT_FORWARDS:
            del self._made[next(iter(self._made))]
        return table[scale]
