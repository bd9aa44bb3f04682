"""The bias γ ⊙ c + β of every linear SSF scales (ssf.py `_ScaledLinear`), for all of a model's
linears at once, in the dtype they compute in.

Alone, each linear's bias is a cast of c (which autocast makes too) and an addcmul: two launches
per linear and step, 96 on ViT-B/16, where launches are the cost. Here one foreach addcmul makes
every linear's in float32 and one foreach copy casts them all. The bias takes no gradient
through this path (the scale's and shift's gradients are the node's reductions), so the batch is
plain values, made once per forward (`trained_casts.forward_token`) when a linear first asks: a
step's update, or a write through .data, is seen by the next forward. Linears are noted as
forwards read them (weakly), so the first forward after attaching makes each as it goes. One
process only (FSDP frees and refills gathered parameters between uses: the caller passes None
there); copies and pickles start empty.
"""

from __future__ import annotations

import torch

from petlkit.methods.base import StartsEmpty
from petlkit.methods.trained_casts import empty_alike


def linear_offset(bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """γ ⊙ c + β (β without a bias) in `dtype`, formed in the parameters' dtype: one linear's,
    as the batch forms it (the same rounding either way)."""
    with torch.no_grad():
        made = shift if bias is None else torch.addcmul(shift, bias, scale)
        return made.to(dtype)


class LinearOffsets(StartsEmpty):
    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._read = WeakIdKeyDictionary()  # owner → None: every scaled linear read so far
        self._forward: object = None
        self._made: dict[tuple, tuple] = {}  # (id(owner), dtype) → (owner, offset)

    def of(self, owner, inputs, dtype: torch.dtype, forward: object) -> torch.Tensor:
        """`owner`'s γ ⊙ c + β in `dtype`, from the batch of the forward `forward`;
        `inputs(owner)` gives any linear's (c, γ, β) as read now."""
        self._read[owner] = None
        key = (id(owner), dtype)
        made = self._made.get(key) if forward is self._forward else None
        if made is None:  # (the batch holds its owners, so an id is not reused while in it)
            self._make(owner, inputs, dtype, forward)
            made = self._made[key]
        return made[1]

    def _make(self, asking, inputs, dtype: torch.dtype, forward: object) -> None:
        owners = list(self._read)
        read = [inputs(o) for o in owners]
        mine = read[owners.index(asking)]
        like = [(t.device, t.dtype) if t is not None else None for t in mine]
        keep = [i for i, r in enumerate(read)
                if [(t.device, t.dtype) if t is not None else None for t in r] == like]  # fmt: skip
        owners, read = [owners[i] for i in keep], [read[i] for i in keep]
        biases, scales, shifts = (list(part) for part in zip(*read, strict=True))
        with torch.no_grad():
            wide = shifts if mine[0] is None else torch._foreach_addcmul(shifts, biases, scales)
            if wide[0].dtype != dtype:  # pieces of one allocation, one foreach copy
                made = empty_alike(wide, [dtype] * len(wide))
                torch._foreach_copy_(made, wide)
                wide = made
        made = {(id(o), dtype): (o, w) for o, w in zip(owners, wide, strict=True)}
        if forward is self._forward:  # another dtype or device in the same forward: kept beside
            self._made.update(made)
        else:
            self._forward, self._made = forward, made
