"""SSF's cheaper unfolded forms (methods/ssf.py): on a LayerNorm, the norm run with weight γ ⊙ w
and bias γ ⊙ b + β; elsewhere one node for γ ⊙ out + β. Both give the plain form's outputs and
gradients."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

import petlkit
from petlkit.methods.ssf import SSFTuner, _ScaleShift
from tests.helpers import OpSizes


def _tuner(layer: nn.Module, dtype=torch.float32) -> SSFTuner:
    torch.manual_seed(0)
    tuner = SSFTuner(layer, "t", std=0.3).to(dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    return tuner


def _plain(tuner: SSFTuner, x: torch.Tensor) -> torch.Tensor:
    out = tuner.base_layer(x)
    shape = (-1, 1, 1) if isinstance(tuner.base_layer, nn.Conv2d) else (-1,)
    return out * tuner.ssf_scale.view(shape) + tuner.ssf_shift.view(shape)


def _grads(tuner, x, fn):
    tuner.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), [x.grad, tuner.ssf_scale.grad, tuner.ssf_shift.grad]


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.LayerNorm(8), (3, 5, 8)),
        (nn.LayerNorm(8, bias=False), (3, 5, 8)),
        (nn.Linear(6, 8), (3, 5, 6)),
        (nn.Conv2d(3, 8, 2), (2, 3, 5, 5)),
    ],
)
def test_the_unfolded_forms_give_the_plain_forms_outputs_and_gradients(layer, shape):
    tuner = _tuner(layer)
    with torch.no_grad():  # a trained norm's affine is not the identity
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(shape)
    out, grads = _grads(tuner, x, tuner)
    want_out, want = _grads(tuner, x, lambda t: _plain(tuner, t))
    torch.testing.assert_close(out, want_out)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_the_scale_shift_node_in_bf16_matches_autograd_bit_for_bit():
    torch.manual_seed(0)
    out = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    scale, shift = (torch.randn(8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    weights = torch.linspace(-1, 2, out.numel()).view(out.shape)

    def grads(fn):
        tensors = (out, scale, shift)
        for t in tensors:
            t.grad = None
        y = fn(out, scale, shift)
        (y.float() * weights).sum().backward()
        return y.detach(), [t.grad for t in tensors]

    got_y, got = grads(_ScaleShift.apply)
    want_y, want = grads(lambda o, g, b: torch.addcmul(b, o, g))
    assert torch.equal(got_y, want_y)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_frozen_linears_scale_in_bf16_is_as_close_to_exact_as_autograds():
    tuner = _tuner(nn.Linear(16, 8), torch.bfloat16)
    with torch.no_grad():
        tuner.base_layer.bias.add_(0.5)  # a shift to recover the layer's output through
        tuner.ssf_shift.add_(0.3)
    x = torch.randn(4, 3, 16, dtype=torch.bfloat16)

    def addcmul(t):
        return torch.addcmul(tuner.ssf_shift, tuner.base_layer(t), tuner.ssf_scale)

    out, grads = _grads(tuner, x, tuner)
    want_out, want = _grads(tuner, x, addcmul)
    wide = tuner.to(torch.float64)
    exact_out, exact = _grads(wide, x.double(), addcmul)
    # one GEMM with γ ⊙ W and γ's gradient recovered from the output: rounding, not method
    cases = zip([out, *grads], [want_out, *want], [exact_out, *exact], strict=True)
    for ours, theirs, truth in cases:
        mine, autograds = ((t.double() - truth).abs().max() for t in (ours, theirs))
        assert mine <= 2 * autograds + 2e-2 * truth.abs().max(), (mine, autograds)


def test_the_fused_form_runs_only_on_a_plain_frozen_linear():
    x = torch.randn(2, 3, 6, requires_grad=True)
    for layer, fused in [(nn.Linear(6, 8), True), (nn.Linear(6, 8, bias=False), True),
                         (nn.Linear(6, 8), False)]:  # fmt: skip
        tuner = _tuner(layer)
        if not fused:
            layer.weight.requires_grad_(True)  # trained too (full fine-tuning beside SSF)
        out = tuner(x)
        assert (type(out.grad_fn).__name__ == "_ScaledLinearBackward") is fused
        out, grads = _grads(tuner, x, tuner)
        want_out, want = _grads(tuner, x, lambda t, tuner=tuner: _plain(tuner, t))
        torch.testing.assert_close(out, want_out)
        for got, expected in zip(grads, want, strict=True):
            torch.testing.assert_close(got, expected)
        if not fused:
            assert layer.weight.grad is not None


def test_a_frozen_linear_under_autocast_computes_as_autocast_would():
    tuner = _tuner(nn.Linear(16, 8))  # float32 weights, float32 input, bf16 autocast
    x = torch.randn(4, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(tuner, x, tuner)
        want_out, want = _grads(tuner, x, lambda t: torch.addcmul(
            tuner.ssf_shift.to(torch.bfloat16), tuner.base_layer(t),
            tuner.ssf_scale.to(torch.bfloat16)))  # fmt: skip
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out, rtol=2e-2, atol=2e-2)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_ssf_on_a_vit_under_autocast_trains_every_scale_and_shift(vit_case):
    petl = petlkit.attach(vit_case.make(), "ssf")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = petl(**vit_case.inputs)
    out.float().square().mean().backward()
    trained = {n: p for n, p in petl.named_parameters() if "ssf_" in n}
    norms = [n for n in trained if "norm" in n]
    assert norms and all(trained[n].grad is not None for n in trained)
    assert all(trained[n].grad.abs().sum() > 0 for n in norms)


def test_on_a_layer_norm_nothing_passes_over_the_output():
    tuner = _tuner(nn.LayerNorm(8))
    x = torch.randn(3, 5, 8, requires_grad=True)
    with OpSizes() as seen:
        tuner(x).sum().backward()
    big = {name for name, size in seen.ops if size == x.numel()}
    assert "native_layer_norm" in big and not {"addcmul", "mul", "add"} & big


def test_a_frozen_linears_scale_and_shift_take_one_reduction_over_the_output_backward():
    tuner = _tuner(nn.Linear(6, 8))
    x = torch.randn(3, 5, 6, requires_grad=True)  # γ meets W, not the output's gradient
    out = tuner(x)
    grad = torch.randn_like(out)
    with OpSizes() as seen:
        out.backward(grad)
    big = [name for name, size in seen.ops if size == out.numel()]
    assert big.count("native_batch_norm_backward") == 1 and not {"mul", "sum"} & set(big), big
    assert ("mul", 8 * 6) not in seen.ops  # γ ⊙ W is kept from the forward, not made again


def test_a_frozen_linears_scaled_weight_is_one_product_from_its_own_weight_under_autocast():
    """γ ⊙ W is made from the float32 weight and scale by one product that writes bf16 (the
    cast autocast makes of W, with γ in it): no cast of W, and no cast of γ."""
    tuner = _tuner(nn.Linear(6, 8))
    x = torch.randn(3, 5, 6)
    with OpSizes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = tuner(x)
    weight_sized = [name for name, size in seen.ops if size == 8 * 6 and name != "t"]
    assert out.dtype == torch.bfloat16 and weight_sized == ["mul"], weight_sized
    want = _plain(tuner, x.bfloat16().float())
    torch.testing.assert_close(out.float(), want, rtol=0.02, atol=0.02)


def test_a_frozen_linears_scale_keeps_only_its_output():
    tuner = _tuner(nn.Linear(6, 8))
    out = tuner(torch.randn(3, 5, 6, requires_grad=True))
    big = [t for t in out.grad_fn.saved_tensors if t.numel() == out.numel()]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == out.data_ptr()


def test_a_frozen_linears_scale_node_passes_gradcheck_in_float64():
    from petlkit.methods.linear_offsets import linear_offset
    from petlkit.methods.ssf import _ScaledLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scale = (1 + 0.5 * torch.randn(4, dtype=torch.float64)).requires_grad_(True)
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for b in (bias, None):
        assert torch.autograd.gradcheck(
            lambda x, g, s, b=b: _ScaledLinear.apply(
                x, weight, linear_offset(b, g, s, g.dtype), g, s
            ),
            (x, scale, shift),
        )


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("attached", [False, True])  # alone, or 1/γ made for every site at once
def test_a_channel_scaled_to_zero_gets_a_finite_gradient(attached, sign):
    tuner = _tuner(nn.Linear(6, 8))
    model = petlkit.attach(nn.Sequential(tuner.base_layer), "ssf") if attached else tuner
    if attached:
        tuner = model.model[0]
    with torch.no_grad():
        tuner.ssf_scale[3] = sign * 0.0
    model(torch.randn(3, 5, 6)).square().sum().backward()
    assert torch.isfinite(tuner.ssf_scale.grad).all() and torch.isfinite(tuner.ssf_shift.grad).all()


def test_under_autocast_the_scale_and_shift_get_float32_gradients_from_the_node_itself():
    """γ and β receive their gradients in float32 from the node (not a bf16 gradient cast
    back), and in a trainer's accumulating backward without autograd's accumulation."""
    petl = petlkit.attach(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "ssf")
    x = torch.randn(4, 6)

    def grads(accumulate: bool):
        petl.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = petl(x).float().square().sum()
        with OpSizes() as seen, petl.accumulating_backward() if accumulate else nullcontext():
            loss.backward()
        accumulations = [name for name, _ in seen.ops].count("detach")  # autograd's, one each
        return {n: p.grad for n, p in petl.named_parameters() if p.requires_grad}, accumulations

    (plain, accumulated), (direct, left) = grads(False), grads(True)
    assert plain and plain.keys() == direct.keys()
    assert accumulated - left == len(plain)  # none of the four accumulated by autograd
    for name, g in plain.items():
        assert g.dtype == torch.float32 and torch.equal(g, direct[name]), name


def test_a_linears_scale_and_shift_sum_over_leading_dims_in_one_call_each():
    out = torch.randn(3, 5, 8)  # a layer's output that needs no gradient: SSF's backward only
    scale, shift = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    loss = _ScaleShift.apply(out, scale, shift).sum()
    with OpSizes() as seen:
        loss.backward()
    names = [name for name, _ in seen.ops]
    assert names.count("sum") == 2 and "view" not in names, names


def test_a_norms_affine_under_ssf_takes_two_ops_backward_and_trains_the_norm_too():
    tuner = _tuner(nn.LayerNorm(8))
    x = torch.randn(3, 5, 8)
    loss = tuner(x).sum()
    with OpSizes() as seen:
        loss.backward()
    channel_ops = [name for name, size in seen.ops if size == 8 and name != "detach"]
    assert sorted(channel_ops) == ["addcmul", "mul"]  # γ's gradient: dw ⊙ w + db ⊙ b
    for p in tuner.base_layer.parameters():  # BitFit or a full norm trained beside SSF
        p.requires_grad_(True)
    with torch.no_grad():
        for p in tuner.base_layer.parameters():
            p.add_(0.2 * torch.randn_like(p))

    def grads(fn):
        tuner.zero_grad(set_to_none=True)
        (fn(x) * torch.linspace(-1, 2, x.numel()).view(x.shape)).sum().backward()
        return [p.grad.clone() for p in (*tuner.base_layer.parameters(), tuner.ssf_scale,
                                         tuner.ssf_shift)]  # fmt: skip

    for got, want in zip(grads(tuner), grads(lambda t: _plain(tuner, t)), strict=True):
        torch.testing.assert_close(got, want)


def test_a_dtype_mismatch_without_autocast_fails_as_the_bare_layer_does():
    layer = nn.Linear(6, 8).to(torch.bfloat16)
    x = torch.randn(2, 6)  # float32 into a bf16 layer, no autocast
    with pytest.raises(RuntimeError) as bare:
        layer(x)
    tuner = SSFTuner(layer.requires_grad_(False), "t", std=0.3)  # its scales in float32
    with pytest.raises(RuntimeError) as wrapped:
        tuner(x)
    assert str(wrapped.value) == str(bare.value)
