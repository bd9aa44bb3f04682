"""UniPELT's gated prefix (methods/prefix.py: `GatedPrefix`): every example's keys and values
times its gate, with the broadcast product's values and gradients, and a backward of two small
GEMMs where autograd's product node launches a product and a sum per input."""

from __future__ import annotations

import pytest
import torch

from petlkit.cost.counter import OpCounter, StepCount
from petlkit.methods.prefix import GatedPrefix

BATCH, HEADS, LENGTH, DIM = 3, 2, 4, 5


def _inputs(contiguous: bool):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    kv = torch.randn(LENGTH, 2, HEADS, DIM, **f64).permute(1, 2, 0, 3)  # as key_values() lays it
    kv = (kv.contiguous() if contiguous else kv).requires_grad_()
    gate = torch.rand(BATCH, 1, **f64, requires_grad=True)
    return kv, gate


@pytest.mark.parametrize("contiguous", [True, False])
def test_the_gated_prefix_is_the_broadcast_product_with_exact_gradients(contiguous):
    kv, gate = _inputs(contiguous)
    got = GatedPrefix.apply(kv, gate)
    want = kv * gate.view(BATCH, 1, 1, 1, 1)
    assert got.shape == (BATCH, 2, HEADS, LENGTH, DIM)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.autograd.gradcheck(GatedPrefix.apply, (kv, gate))
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (kv, gate), grad),
                               torch.autograd.grad(want, (kv, gate), grad))  # fmt: skip


def test_its_backward_is_two_gemms_and_no_pass_over_the_product():
    kv, gate = _inputs(contiguous=True)
    out = GatedPrefix.apply(kv, gate)
    count = StepCount()
    with OpCounter(count):
        out.backward(torch.ones_like(out))
    kernels = [op.name for op in count.ops if op.kernels]
    assert kernels.count("aten.mm") == 2
    assert not {"aten.mul", "aten.sum"} & set(kernels)


@pytest.mark.parametrize("name", ["bert_case", "vit_case"])
@pytest.mark.parametrize("autocast", [False, True])
def test_unipelt_gates_every_blocks_prefix_through_the_node(name, autocast, request, monkeypatch):
    """One `GatedPrefix` per block, reading contiguous keys and values (the backward's GEMM then
    reads them without a copy), whether or not the per-forward cast had to change the dtype."""
    import petlkit
    import petlkit.methods.prefix as prefix_module
    from petlkit.layout import layout_of

    case = request.getfixturevalue(name)
    read = []
    original = prefix_module.GatedPrefix.apply
    monkeypatch.setattr(prefix_module.GatedPrefix, "apply",
                        lambda kv, g: read.append(kv) or original(kv, g))  # fmt: skip
    petl = petlkit.attach(case.make(), "unipelt-ap")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = petl(**case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    assert len(read) == len(layout_of(case.make()).blocks)
    assert all(kv.is_contiguous() for kv in read)
    gates = [p for n, p in petl.named_parameters() if "prefix" in n and "gate" in n]
    assert gates and all(p.grad is not None for p in gates)
