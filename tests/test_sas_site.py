"""SaS's site transform as one autograd node (methods/sas_site.py): the function
x ⊙ a + b + s·(x·A)·B and its gradients, for every block's rows made at once; the one pass over
the activation each way is the cast the site's linears would make; configurations the node does
not cover take the plain path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import petlkit
from petlkit.methods.placement import compute_input
from petlkit.methods.sas_site import SiteTransform, site_constants, site_rows
from tests.helpers import OpSizes

N, D, R, DEPTH = 7, 12, 3, 3


def _parameters(dtype=torch.float64, zero_scale=False):
    """(a, b, A, B): the scales (DEPTH, D), shifts (DEPTH, D), A (D, R), B (R, D)."""
    torch.manual_seed(0)
    made = [1 + 0.3 * torch.randn(DEPTH, D), torch.randn(DEPTH, D), torch.randn(D, R),
            torch.randn(R, D)]  # fmt: skip
    if zero_scale:
        made[0][1, 4] = 0.0
    return [t.to(dtype).requires_grad_(True) for t in made]


def _node(x, scale, shift, down, up, alpha, dtype):
    """Every block's site on x, weighted by block (each block's output reaches the loss)."""
    rows = site_rows(scale, shift, down, up, alpha, dtype)
    ones, zeros = site_constants(R, D, dtype, x.device)
    return [SiteTransform.apply(x, *row, ones, zeros) for row in rows]


def _plain(x, scale, shift, down, up, alpha):
    return [torch.addmm(torch.addcmul(shift[i], x, scale[i]), x @ down, up, alpha=alpha)
            for i in range(DEPTH)]  # fmt: skip


def _loss(outs):
    return sum((i + 1) * out.float().square().sum() for i, out in enumerate(outs))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_site_node_gives_the_functions_outputs_and_gradients(alpha, x_grad):
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=x_grad)
    mine, theirs = _parameters(), _parameters()
    outs = _node(x, *mine, alpha, torch.float64)
    want = _plain(x.detach().requires_grad_(x_grad), *theirs, alpha)
    for out, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(out, expected)
    _loss(outs).backward()
    _loss(want).backward()
    for i, (p, q) in enumerate(zip(mine, theirs, strict=True)):
        torch.testing.assert_close(p.grad, q.grad, msg=f"parameter {i}")
    assert (x.grad is not None) == x_grad


def test_the_site_node_passes_gradcheck():
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)

    def total(x, *params):
        return torch.stack(_node(x, *params, 0.7, torch.float64)).sum(0)

    assert torch.autograd.gradcheck(total, (x, *_parameters()))


def _as_node_reads(params, dtype):
    """(a, b, A, B) as SaS hands them to the node computing in `dtype`: a and A in float32 at
    least, b and B in `dtype` (casts of the float64 leaves, which receive the gradients)."""
    wide = torch.promote_types(dtype, torch.float32)
    scale, shift, down, up = params
    return scale.to(wide), shift.to(dtype), down.to(wide), up.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("zero_scale", [False, True])
def test_the_node_computes_the_function_in_each_dtype(dtype, zero_scale):
    """Under bf16 autocast the node reads the float32 input and gives bf16 and a float32
    gradient. A scale of exactly 0 (1/a made finite) keeps its channel in the low-rank path:
    the output and every gradient are the function's, finite."""
    x64 = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    wide = torch.promote_types(dtype, torch.float32)
    x = x64.detach().to(wide).requires_grad_(True)
    mine, theirs = _parameters(zero_scale=zero_scale), _parameters(zero_scale=zero_scale)
    outs = _node(x, *_as_node_reads(mine, dtype), 1.0, dtype)
    want = _plain(x64, *theirs, 1.0)
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 0.03, "atol": 0.1}
    for out, expected in zip(outs, want, strict=True):
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, **tol)
    _loss(outs).backward()
    _loss(want).backward()
    assert x.grad.dtype == wide
    for i, (p, q) in enumerate([(x, x64), *zip(mine, theirs, strict=True)]):
        assert torch.isfinite(p.grad).all(), i
        span = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * span / 3, msg=f"gradient {i}")  # fmt: skip


def test_the_site_makes_one_pass_over_the_activation_each_way():
    """Forward: the scaled cast and two GEMMs (no addcmul, no separate cast); backward: the
    GEMMs, one reduction for the scale's gradient, and the scaled cast back."""
    x = torch.randn(64, D, requires_grad=True)
    rows = site_rows(*_as_node_reads(_parameters(), torch.bfloat16), 1.0, torch.bfloat16)
    ones, zeros = site_constants(R, D, torch.bfloat16, x.device)
    with OpSizes() as forward:
        out = SiteTransform.apply(x, *rows[0], ones, zeros)
    big = [name for name, size in forward.ops if size >= x.numel()]
    assert sorted(big) == ["addmm", "addmm", "mul"], big
    grad = torch.randn_like(out)
    with OpSizes() as backward:
        out.backward(grad)
    big = [name for name, size in backward.ops if size >= x.numel()]
    elementwise = [n for n in big if n not in ("mm", "addmm", "t")]
    assert elementwise.count("native_batch_norm_backward") == 1, big
    assert elementwise.count("mul") == 1 and "sum" not in elementwise, big


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
    _perturb(petl)
    out = petl(**case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    return petl


def _perturb(petl):
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


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


def _reference_transform(self, site, index, x):
    """The site as the paper writes it, with the plain ops, from the method's parameters."""
    x = compute_input(x)
    sm = self.site_modules[site]
    a, b = self.generate()[site]
    scale, shift = (1.0 + a[index]).to(x.dtype), b[index].to(x.dtype)
    low = (x @ sm.down.to(x.dtype)) @ sm.up.to(x.dtype)
    return torch.addcmul(shift, x, scale) + self.config.scale * low


@pytest.mark.parametrize("case_name", ["vit_case", "bert_case"])
def test_sas_under_bf16_autocast_trains_as_the_plain_ops_do(case_name, request, monkeypatch):
    from petlkit.methods.sas import SaS

    case = request.getfixturevalue(case_name)

    def grads():
        torch.manual_seed(0)
        petl = petlkit.attach(case.make(), "sas")
        _perturb(petl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = petl(**case.inputs)
        getattr(out, "logits", out).float().square().mean().backward()
        return {n: p.grad for n, p in petl.methods.named_parameters() if p.requires_grad}

    fused = grads()
    monkeypatch.setattr(SaS, "transform", _reference_transform)
    plain = grads()
    assert fused.keys() == plain.keys() and fused
    for name, g in fused.items():
        assert g.dtype == torch.float32
        scale = plain[name].abs().max()
        torch.testing.assert_close(g, plain[name], rtol=0.05, atol=0.05 * scale, msg=name)
