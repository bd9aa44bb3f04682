"""SaS's site transform as one autograd node (methods/sas_site.py): the same outputs and gradients
as addcmul and addmm under autograd; the shared pair's gradients from all blocks meet without an
add per block; configurations the node does not cover take the plain path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import petlkit
from petlkit.methods.sas_site import SiteTransform


def _tensors(dtype=torch.float32, x_grad=True):
    torch.manual_seed(0)
    n, d, r = 7, 12, 3
    made = [torch.randn(n, d), 1 + 0.3 * torch.randn(d), torch.randn(d), torch.randn(d, r),
            torch.randn(r, d)]  # fmt: skip
    return [t.to(dtype).requires_grad_(x_grad or i > 0) for i, t in enumerate(made)]


def _plain(flat, scale, shift, down, up, alpha):
    return torch.addmm(torch.addcmul(shift, flat, scale), flat @ down, up, alpha=alpha)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_site_node_gives_autograds_outputs_and_gradients(alpha, x_grad):
    fused_in, plain_in = _tensors(x_grad=x_grad), _tensors(x_grad=x_grad)
    out = SiteTransform.apply(*fused_in, alpha)
    want = _plain(*plain_in, alpha)
    torch.testing.assert_close(out, want)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    for i, (mine, theirs) in enumerate(zip(fused_in, plain_in, strict=True)):
        if theirs.grad is None:
            assert mine.grad is None and i == 0
            continue
        torch.testing.assert_close(mine.grad, theirs.grad, msg=f"input {i}")


def test_the_site_node_in_bf16_stays_within_bf16_rounding_of_autograd():
    fused_in, plain_in = _tensors(torch.bfloat16), _tensors(torch.bfloat16)
    out, want = SiteTransform.apply(*fused_in, 1.0), _plain(*plain_in, 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().square().sum().backward()
    want.float().square().sum().backward()
    for mine, theirs in zip(fused_in, plain_in, strict=True):
        assert mine.grad.dtype == torch.bfloat16
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0.05, atol=0.05)


class _Adds(TorchDispatchMode):
    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.adds = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("add", "add_") and tuple(args[0].shape) == self.shape:
            self.adds += 1
        return func(*args, **(kwargs or {}))


def _sas_step(case, **fields):
    petl = petlkit.attach(case.make(), "sas", **fields)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    out = petl(**case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    return petl


def test_the_shared_pairs_gradients_meet_without_an_add_per_block(vit_case):
    petl = petlkit.attach(vit_case.make(), "sas")
    down = next(p for n, p in petl.named_parameters() if n.endswith("down"))
    assert len(petl.model.blocks) > 1
    with _Adds(tuple(down.shape)) as seen:
        out = petl(**vit_case.inputs)
        out.float().square().mean().backward()
    assert seen.adds == 0 and down.grad is not None


@pytest.mark.parametrize(
    "fields", [{"dropout": 0.1}, {"shared": False}, {"specific": False}, {"scale": 0.5}]
)
def test_every_sas_configuration_trains_every_parameter(vit_case, fields, monkeypatch):
    import petlkit.methods.sas as sas_module

    calls = []
    original = sas_module.SiteTransform.apply
    monkeypatch.setattr(sas_module.SiteTransform, "apply",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    petl = _sas_step(vit_case, **fields).train()
    fused = fields in ({"scale": 0.5},)
    assert bool(calls) == fused
    grads = {n: p.grad for n, p in petl.methods.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), grads.keys()
