"""Every layer norm's affine under SSF, (w ⊙ γ, b ⊙ γ + β), for all norms of a model at once.

Alone, each norm's affine is two small kernels forward and two backward (γ's gradient
dw ⊙ w + db ⊙ b): four launches per norm and step, 100 on ViT-B/16, where the host and the
launches are the cost. Here one autograd node makes every norm's pair with two foreach launches
and returns every γ's gradient with two more. A batch is made when a norm asks for its pair and
the batch of the forward running (`trained_casts.forward_token`) has none unused for it: the first
norm of each forward (each forward's graph gets its own node; micro-batches accumulate as
usual), or a norm read twice in one forward. Outside a model's forward (activation
checkpointing's recomputation) each norm makes its own.
Norms are noted as forwards read them (weakly), so the first forward after attaching computes
them as it goes. One process only (FSDP frees gathered parameters between uses); copies and
pickles start empty.
"""

from __future__ import annotations

import torch

from petlkit.methods.base import StartsEmpty


class NormAffines(StartsEmpty):
    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._norms = WeakIdKeyDictionary()  # owner → None: every norm read so far
        self._forward: object = None  # the forward the batch was made in
        self._batch: dict[int, tuple] = {}  # id(owner) → (owner, weight', bias'), not taken yet

    def pair(self, owner, inputs, forward: object) -> tuple[torch.Tensor, torch.Tensor]:
        """(w ⊙ γ, b ⊙ γ + β) of `owner`'s norm from the batch of the forward `forward`
        (`trained_casts.forward_token`); `inputs(owner)` gives any norm's (w, b, γ, β) as read
        now."""
        self._norms[owner] = None
        made = self._batch.pop(id(owner), None) if forward is self._forward else None
        if made is None or made[0] is not owner:  # the forward's first norm, or one read again
            self._make(owner, inputs, forward)
            made = self._batch.pop(id(owner))
        return made[1], made[2]

    def _make(self, asking, inputs, forward: object) -> None:
        owners = list(self._norms)
        read = [inputs(o) for o in owners]
        mine = read[owners.index(asking)]
        like = [(t.device, t.dtype) for t in mine]
        keep = [i for i, r in enumerate(read) if [(t.device, t.dtype) for t in r] == like]
        owners, read = [owners[i] for i in keep], [read[i] for i in keep]
        n = len(owners)
        made = _AllNormAffines.apply(n, *(t for part in zip(*read, strict=True) for t in part))
        self._forward = forward
        self._batch = {id(o): (o, made[i], made[n + i]) for i, o in enumerate(owners)}


class _AllNormAffines(torch.autograd.Function):
    """(w_i ⊙ γ_i, b_i ⊙ γ_i + β_i) for every i by two foreach launches; backward, γ_i's
    gradient dw_i ⊙ w_i + db_i ⊙ b_i by two more (and w_i's, b_i's where they train)."""

    @staticmethod
    def forward(ctx, n: int, *tensors: torch.Tensor):  # noqa: D102 (torch's interface)
        weights, biases, scales, shifts = (list(tensors[i * n : (i + 1) * n]) for i in range(4))
        ctx.n = n
        ctx.save_for_backward(*weights, *biases, *scales)
        return (*torch._foreach_mul(weights, scales),
                *torch._foreach_addcmul(shifts, biases, scales))  # fmt: skip

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # noqa: D102
        n, needs = ctx.n, ctx.needs_input_grad[1:]
        saved = ctx.saved_tensors
        weights, biases, scales = saved[:n], saved[n : 2 * n], saved[2 * n :]
        d_weights, d_biases = list(grads[:n]), list(grads[n:])
        d_scales = None
        if any(needs[2 * n : 3 * n]):
            d_scales = torch._foreach_mul(d_weights, list(weights))
            torch._foreach_addcmul_(d_scales, d_biases, list(biases))
        out_weights = torch._foreach_mul(d_weights, list(scales)) if any(needs[:n]) else None
        out_biases = torch._foreach_mul(d_biases, list(scales)) if any(needs[n : 2 * n]) else None

        def each(values, first):
            return [v if needs[first + i] else None
                    for i, v in enumerate(values or [None] * n)]  # fmt: skip

        return (None, *each(out_weights, 0), *each(out_biases, n), *each(d_scales, 2 * n),
                *each(d_biases, 3 * n))  # fmt: skip
