"""LoRA's update as one autograd node (methods/lora_update.py): the outputs and gradients of
F.linear and addmm under autograd, gated (UniPELT) or not; dropout LoRA takes the plain path."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.methods.lora_update import GatedLoRAUpdate, LoRAUpdate


def _inputs(dtype=torch.float32, x_grad=True):
    torch.manual_seed(0)
    x, out = torch.randn(3, 5, 6), torch.randn(3, 5, 8)
    down, up = torch.randn(4, 6), torch.randn(8, 4)
    return [t.to(dtype).requires_grad_(x_grad or i > 0) for i, t in enumerate((x, out, down, up))]


def _plain(x, out, down, up, scaling):
    h = torch.nn.functional.linear(x, down)
    flat = torch.addmm(out.reshape(-1, 8), h.reshape(-1, 4), up.t(), alpha=scaling)
    return flat.view(out.shape)


@pytest.mark.parametrize("scaling", [1.0, 2.0])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_update_node_gives_autograds_outputs_and_gradients(scaling, x_grad, dtype):
    mine, theirs = _inputs(dtype, x_grad), _inputs(dtype, x_grad)
    out = LoRAUpdate.apply(*mine, scaling)
    want = _plain(*theirs, scaling)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out, want)
    weight = torch.randn(out.shape).to(dtype)
    (out * weight).float().sum().backward()
    (want * weight).float().sum().backward()
    close = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    for i, (got, expected) in enumerate(zip(mine, theirs, strict=True)):
        if expected.grad is None:
            assert got.grad is None and i == 0
            continue
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad, expected.grad, msg=f"input {i}", **close)


def _count_node(monkeypatch, node: str = "LoRAUpdate") -> list:
    import petlkit.methods.lora as lora_module

    calls: list = []
    original = getattr(lora_module, node).apply
    monkeypatch.setattr(getattr(lora_module, node), "apply",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    return calls


def _perturbed_step(case, **fields):
    """LoRA (B moved off zero) on `case`, one bf16 forward and backward; the PetlModel."""
    petl = petlkit.attach(case.make(), "lora", **fields)
    with torch.no_grad():
        for name, p in petl.named_parameters():
            if "lora_B" in name:
                p.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = petl(**case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    return petl


@pytest.mark.parametrize("kind", ["vit_case", "bert_case"])
def test_lora_trains_through_the_node_on_fused_and_separate_projections(kind, request, monkeypatch):
    case = request.getfixturevalue(kind)
    calls = _count_node(monkeypatch)
    petl = _perturbed_step(case)
    assert calls
    grads = [p.grad for n, p in petl.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dropout_lora_takes_the_plain_path(vit_case, monkeypatch):
    calls = _count_node(monkeypatch)
    petl = petlkit.attach(vit_case.make(), "lora", dropout=0.1)
    petl(**vit_case.inputs).float().sum().backward()
    assert not calls


def _gated_inputs(positions: int, dtype=torch.float64, x_grad=True):
    torch.manual_seed(0)
    x, out = torch.randn(2, 5, 6), torch.randn(2, 5, 8)
    down, up = torch.randn(6, 6), torch.randn(8, 6)  # three parts of rank 2
    gate = torch.rand(2, positions, 3, 1)
    tensors = (x, out, down, up, gate)
    return [t.to(dtype).requires_grad_(x_grad or i > 0) for i, t in enumerate(tensors)]


def _plain_gated(x, out, down, up, gate):
    h = torch.nn.functional.linear(x, down)
    h = (h.unflatten(-1, (3, 2)) * gate).flatten(-2)
    return torch.addmm(out.reshape(-1, 8), h.reshape(-1, 6), up.t()).view(out.shape)


@pytest.mark.parametrize("positions", [1, 5])  # one gate per example (encoders), per position
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_gated_node_gives_autograds_outputs_and_gradients(positions, x_grad):
    mine, theirs = _gated_inputs(positions, x_grad=x_grad), _gated_inputs(positions, x_grad=x_grad)
    assert torch.autograd.gradcheck(GatedLoRAUpdate.apply, tuple(mine))
    out, want = GatedLoRAUpdate.apply(*mine), _plain_gated(*theirs)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    weight = torch.randn(out.shape, dtype=out.dtype)
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    for i, (got, expected) in enumerate(zip(mine, theirs, strict=True)):
        if expected.grad is None:
            assert got.grad is None and i == 0
            continue
        assert got.grad.shape == expected.grad.shape, i
        torch.testing.assert_close(got.grad, expected.grad, msg=f"input {i}")


@pytest.mark.parametrize("kind", ["vit_case", "bert_case", "llama"])
def test_gated_lora_trains_through_the_gated_node(kind, request, monkeypatch):
    """Per-example gates on fused q|k|v (ViT) and separate q, v (BERT); per-position gates on
    a decoder (LLaMA, causal)."""
    from tests.helpers import tiny_llama

    if kind == "llama":
        ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(0))
        case = type("Case", (), {"make": tiny_llama, "inputs": {"input_ids": ids}})
    else:
        case = request.getfixturevalue(kind)
    calls = _count_node(monkeypatch, "GatedLoRAUpdate")
    petl = _perturbed_step(case, gated=True)
    assert calls
    grads = {n: p.grad for n, p in petl.named_parameters() if p.requires_grad and "head" not in n}
    assert any("gate" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
