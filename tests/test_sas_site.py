"""SaS's site transform as one autograd node (methods/sas_site.py): the same outputs and gradients
as addcmul and addmm under autograd; the shared pair's gradients from all blocks meet without an
add per block; configurations the node does not cover take the plain path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import petlkit
from petlkit.methods.sas_site import SiteTransform
from tests.helpers import OpSizes


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


def test_the_scale_and_shift_gradients_are_one_reduction_over_the_input_and_its_gradient():
    flat, *rest = _tensors()
    out = SiteTransform.apply(flat, *rest, 1.0)
    grad = torch.randn_like(out)
    with OpSizes() as seen:
        out.backward(grad)
    big = [name for name, size in seen.ops if size == flat.numel()]
    assert big.count("native_batch_norm_backward") == 1 and "sum" not in big, big
    assert big.count("mul") == 1  # the gradient through the scale: g ⊙ a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_receive_the_scale_and_shift_gradients_in_float32(dtype):
    flat, scale, shift, down, up = _tensors(dtype)
    wide = [t.detach().float().requires_grad_(True) for t in (scale, shift)]
    out = SiteTransform.apply(flat, scale, shift, down, up, 1.0, *wide, None)
    out.float().square().sum().backward()
    assert scale.grad is None and shift.grad is None
    assert all(w.grad.dtype == torch.float32 for w in wide)
    plain_in = _tensors(dtype)
    _plain(*plain_in, 1.0).float().square().sum().backward()
    tol = {} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    for w, theirs in zip(wide, plain_in[1:3], strict=True):
        torch.testing.assert_close(w.grad, theirs.grad.float(), **tol)


def test_sas_under_bf16_autocast_trains_as_the_plain_ops_do(vit_case, monkeypatch):
    import petlkit.methods.sas as sas_module

    def grads():
        torch.manual_seed(0)
        petl = petlkit.attach(vit_case.make(), "sas")
        with torch.no_grad():
            for p in petl.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = petl(**vit_case.inputs)
        out.float().square().mean().backward()
        return {n: p.grad for n, p in petl.methods.named_parameters() if p.requires_grad}

    fused = grads()
    monkeypatch.setattr(sas_module.SiteTransform, "apply",
                        lambda flat, scale, shift, down, up, alpha, *rest:
                        _plain(flat, scale, shift, down, up, alpha))  # fmt: skip
    plain = grads()
    assert fused.keys() == plain.keys() and fused
    for name, g in fused.items():
        assert g.dtype == torch.float32
        scale = plain[name].abs().max()
        torch.testing.assert_close(g, plain[name], rtol=0.05, atol=0.05 * scale, msg=name)
