"""SSF's per-forward batches (methods/channel_sums.py ScaleInverses, norm_affines.py,
linear_offsets.py): what each site would make alone (1/γ, a layer norm's affine, a scaled
linear's bias) made for all sites at once, made again for each forward, and the same values and
gradients as each site alone."""

from __future__ import annotations

import copy

import torch
from torch import nn

import petlkit
from petlkit.methods.ssf import SSFTuner
from tests.helpers import OpSizes


def test_one_step_makes_every_sites_inverse_scale_at_once_and_the_next_anew(vit_case):
    petl = petlkit.attach(vit_case.make(), "ssf")
    linears = [m for m in petl.modules() if isinstance(m, SSFTuner)
               and type(m.base_layer) is nn.Linear]  # fmt: skip
    optimizer = torch.optim.SGD([p for p in petl.parameters() if p.requires_grad], lr=0.5)

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(**vit_case.inputs).float().square().mean()
        with OpSizes() as seen:
            loss.backward()
        names = [name for name, _ in seen.ops]
        return names, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with torch.no_grad():  # a first forward notes the layer norms as it reads them
        petl(**vit_case.inputs)
    for moved in ("", "optimizer", "data"):  # made again from the new values, however moved
        if moved == "optimizer":
            optimizer.step()
        elif moved == "data":  # around autograd: no version change
            for tuner in linears:
                tuner.ssf_scale.data.mul_(1.5)
        names, grads = step(petl)
        assert names.count("_foreach_reciprocal") == 1 and "reciprocal" not in names
        assert names.count("_foreach_addcmul_") == 1  # every norm's γ gradient, at once
        alone = _each_alone(petl)
        names, want = step(alone)
        assert names.count("reciprocal") == len(linears) > 1
        assert "_foreach_addcmul_" not in names
        assert grads.keys() == want.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want[name], msg=name)
    names, _ = step(copy.deepcopy(petl))  # a copy's tuners share their own
    assert names.count("_foreach_reciprocal") == 1 and "reciprocal" not in names


def test_one_forward_makes_every_scaled_linears_bias_at_once_and_the_next_anew(vit_case):
    """γ ⊙ c + β of every scaled linear: one foreach addcmul and one foreach copy (the cast to
    bf16) per forward, no addcmul or bias cast per linear; made again after an optimizer step
    or a write through .data; the same outputs as each linear making its own."""
    petl = petlkit.attach(vit_case.make(), "ssf")
    for tuner in petl.modules():  # the layer norms' affines alone: their foreach is not counted
        if isinstance(tuner, SSFTuner):
            tuner._norms = None
    linears = [m for m in petl.modules() if isinstance(m, SSFTuner)
               and type(m.base_layer) is nn.Linear]  # fmt: skip
    optimizer = torch.optim.SGD([p for p in petl.parameters() if p.requires_grad], lr=0.5)

    def forward(model):
        with OpSizes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**vit_case.inputs)
        return out, seen.ops

    with torch.no_grad():  # a first forward notes the linears as it reads them
        petl(**vit_case.inputs)
    for moved in ("", "optimizer", "data"):
        if moved == "optimizer":
            petl(**vit_case.inputs).float().square().mean().backward()
            optimizer.step()
        elif moved == "data":
            for tuner in linears:
                tuner.ssf_shift.data.add_(0.25)
        out, ops = forward(petl)
        names = [name for name, _ in ops]
        assert names.count("_foreach_addcmul") == 1, moved
        want, alone_ops = forward(_each_alone(petl))
        alone = [name for name, _ in alone_ops]
        assert "_foreach_addcmul" not in alone and len(linears) > 1
        for op in ("addcmul", "_to_copy"):  # each linear's bias: a cast and an addcmul
            assert alone.count(op) - names.count(op) == len(linears), op
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=moved)


def _each_alone(petl):
    """A copy whose SSF sites each make their own 1/γ and norm affine where they need it."""
    alone = copy.deepcopy(petl)  # a copy starts empty, and copies make theirs too
    for tuner in alone.modules():
        if isinstance(tuner, SSFTuner):
            tuner._inverses = tuner._norms = tuner._offsets = None
    return alone


def test_micro_batches_accumulate_with_each_forwards_inverse_scales_and_norms(vit_case):
    petl = petlkit.attach(vit_case.make(), "ssf")
    alone = _each_alone(petl)

    def grads(model):
        halves = [{k: v[i::2] for k, v in vit_case.inputs.items()} for i in range(2)]
        losses = [model(**h).float().square().mean() for h in halves]  # two forwards, one backward
        sum(losses).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got, want = grads(petl), grads(alone)
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], msg=name)


def test_a_norm_read_twice_in_a_forward_gets_its_affine_each_time():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.other, self.head = nn.LayerNorm(6), nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.norm(self.other(self.norm(x))))

    torch.manual_seed(0)
    petl = petlkit.attach(Twice(), "ssf")
    with torch.no_grad():
        for p in petl.parameters():
            p.add_(0.1 * torch.randn_like(p))
    alone = _each_alone(petl)
    x = torch.randn(4, 6)
    for _ in range(2):  # the first forward notes the norms as it goes, the second batches them
        got = [petl(x).square().sum(), alone(x).square().sum()]
        for loss in got:
            loss.backward()
        torch.testing.assert_close(got[0], got[1])
        for (name, p), q in zip(petl.named_parameters(), alone.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_norm_skipped_by_one_forward_and_read_first_by_the_next_gets_the_new_values():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.LayerNorm(6), nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x, first_b=False):
            return self.head(self.a(self.b(x)) if first_b else self.a(x))

    torch.manual_seed(0)
    petl = petlkit.attach(Skips(), "ssf")
    optimizer = torch.optim.SGD([p for p in petl.parameters() if p.requires_grad], lr=0.5)
    alone = _each_alone(petl)
    optimizer_alone = torch.optim.SGD([p for p in alone.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 6)
    for first_b in (False, True, False, True):  # b: left out, then read first, after a step
        for model, opt in ((petl, optimizer), (alone, optimizer_alone)):
            opt.zero_grad()
            model(x, first_b=first_b).square().sum().backward()
            opt.step()
        for (name, p), q in zip(petl.named_parameters(), alone.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=name)


def test_linear_offsets_are_made_per_forward_in_the_dtype_each_linear_asks_for():
    """Within one forward a linear computing in another dtype (autocast switched off around
    it) gets its bias in that dtype, and the values are each linear's own γ ⊙ c + β."""
    from petlkit.methods.linear_offsets import LinearOffsets, linear_offset

    class Linear:  # what the batch reads of a linear: (c, γ, β)
        def __init__(self, width):
            self.tensors = (torch.randn(width), torch.randn(width), torch.randn(width))

    def inputs(owner):
        return owner.tensors

    first, second = Linear(4), Linear(6)
    offsets, forward = LinearOffsets(), object()
    for owner in (first, second):  # noted as a forward reads them
        offsets.of(owner, inputs, torch.bfloat16, forward)
    made = {}
    for owner, dtype in [(first, torch.bfloat16), (second, torch.float32),
                         (first, torch.bfloat16)]:  # fmt: skip
        got = offsets.of(owner, inputs, dtype, forward)
        assert got.dtype == dtype
        torch.testing.assert_close(got, linear_offset(*owner.tensors, dtype), rtol=0, atol=0)
        # the other dtype's batch is kept beside this one: asked again, not made again
        assert made.setdefault((id(owner), dtype), got) is got
