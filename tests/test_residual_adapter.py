"""An adapter added to the tensor it reads runs as one fused node (methods/residual_adapter.py):
the same outputs and gradients as the adapter's modules under autograd, in float32 and under
bf16 autocast, and the plain path wherever the fused one does not apply."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.cost.counter import gemm_flops
from petlkit.layout import layout_of
from petlkit.methods.adapter import AdapterConfig, Bottleneck

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _bottleneck(causal: bool = False, **fields) -> Bottleneck:
    torch.manual_seed(0)
    adapter = Bottleneck(16, AdapterConfig(reduction_factor=4, **fields), causal=causal)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return adapter


def _run(adapter, y, fused: bool, autocast: bool):
    adapter.zero_grad(set_to_none=True)
    y = y.detach().clone().requires_grad_(True)
    with torch.autocast(**BF16, enabled=autocast):
        out = adapter.residual(y) if fused else y + adapter(y)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return out.detach(), y.grad, {n: p.grad for n, p in adapter.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_adapter_gives_the_modules_outputs_and_gradients(dtype, autocast):
    adapter = _bottleneck()
    y = torch.randn(3, 5, 16).to(dtype)
    out, grad_y, grads = _run(adapter, y, True, autocast)
    want_out, want_y, want = _run(adapter, y, False, autocast)
    assert out.dtype == want_out.dtype and grad_y.dtype == dtype
    exact = {"rtol": 0, "atol": 0} if autocast or dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, want_out, **exact)
    torch.testing.assert_close(grad_y, want_y, **exact)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name, **exact)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_gated_adapter_gives_the_modules_outputs_and_gradients(dtype, autocast, causal):
    """Under autocast the node and the modules round to bf16 at different points (the gate's
    product, the sums), so gradients agree to bf16 rounding there; elsewhere to float32's."""
    adapter = _bottleneck(causal=causal, gated=True)
    y = torch.randn(3, 5, 16).to(dtype)
    out, grad_y, grads = _run(adapter, y, True, autocast)
    want_out, want_y, want = _run(adapter, y, False, autocast)
    assert out.dtype == want_out.dtype and grad_y.dtype == dtype
    low = autocast or dtype == torch.bfloat16
    close = {"rtol": 2e-2, "atol": 2e-2} if low else {}
    torch.testing.assert_close(out, want_out, **close)
    torch.testing.assert_close(grad_y, want_y, **close)
    assert grads.keys() == want.keys() and "gate.linear.weight" in grads
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name, **close)


def test_the_fused_gated_adapter_keeps_of_a_float32_input_only_the_bf16_matrix_it_read():
    """Under autocast it keeps the bf16 cast its down-projection read, as the adapter's own GEMM
    would, and nothing else of the input's size: not the float32 input, not the output."""
    adapter = _bottleneck(gated=True)
    y = torch.randn(4, 6, 16, requires_grad=True)
    kept = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t)
    with hooks, torch.autocast(**BF16):
        out = adapter.residual(y)
    big = [t for t in kept if t.numel() == y.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].shape == (24, 16)
    assert big[0].data_ptr() not in (y.data_ptr(), out.data_ptr())
    torch.testing.assert_close(big[0].view_as(y), y.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("fields", [{"non_linearity": "gelu"}, {"dropout": 0.5}])
def test_adapters_the_fused_node_does_not_cover_take_the_plain_path(fields, monkeypatch):
    import petlkit.methods.adapter as adapter_module

    def refuse(*args):
        raise AssertionError("the fused node ran")

    monkeypatch.setattr(adapter_module.ResidualBottleneck, "apply", refuse)
    adapter = _bottleneck(**fields).eval()
    y = torch.randn(2, 4, 16)
    torch.testing.assert_close(adapter.residual(y), y + adapter(y))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_a_vit_trains_through_the_fused_adapter(vit_case, placement, monkeypatch):
    import petlkit.methods.adapter as adapter_module

    calls = []
    original = adapter_module.ResidualBottleneck.apply
    monkeypatch.setattr(adapter_module.ResidualBottleneck, "apply",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    petl = petlkit.attach(vit_case.make(), "adapter", placement=placement)
    with torch.autocast(**BF16):
        out = petl(**vit_case.inputs)
    out.float().square().mean().backward()
    depth = len(petl.model.blocks)
    assert len(calls) == depth * (2 if placement == "houlsby" else 1)
    ups = [p for n, p in petl.named_parameters() if n.endswith("up.weight")]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)


def test_the_counter_counts_the_epilogue_gemm_as_a_gemm():
    bias, x, w = torch.randn(8), torch.randn(5, 4), torch.randn(8, 4)
    out = torch._addmm_activation(bias, x, w.t())
    plain = gemm_flops(torch.ops.aten.addmm.default, (bias, x, w.t()), {}, out)
    fused = gemm_flops(torch.ops.aten._addmm_activation.default, (bias, x, w.t()), {}, out)
    assert fused == plain == 2 * 5 * 4 * 8


def test_the_fused_gated_adapter_keeps_an_input_already_in_the_compute_dtype():
    adapter = _bottleneck(gated=True).to(torch.bfloat16)
    y = torch.randn(4, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        adapter.residual(y)
    assert any(t.data_ptr() == y.data_ptr() for t in kept)  # exact: not recovered from out


@pytest.mark.parametrize("gated", [False, True])
def test_weight_gradients_come_back_in_the_weights_layout(gated):
    """Contiguous, as the weights are: the foreach copy that casts them back then takes its fast
    path on CUDA, and AccumulateGrad keeps them without a copy (a transposed one is copied)."""
    adapter = _bottleneck(gated=gated)
    y = torch.randn(2, 5, 16, requires_grad=True)
    out = adapter.residual(y)
    weights = [p for n, p in adapter.named_parameters() if n.endswith("weight")]
    grads = torch.autograd.grad(out.square().sum(), weights)
    assert len(grads) == (3 if gated else 2)
    assert all(g.is_contiguous() for g in grads)


def test_a_per_example_gates_backward_forms_no_product_of_the_inputs_size():
    """g ⊙ G and g ⊙ A(y) are never formed: the gate's products with g are taken on rank-r
    tensors; g's own size is read by the GEMMs, one sum per example and the residual's add."""
    from tests.helpers import OpSizes

    adapter = _bottleneck(gated=True)
    y = torch.randn(4, 6, 16, requires_grad=True)
    out = adapter.residual(y)
    grad = torch.linspace(-1, 1, out.numel()).view(out.shape)
    with OpSizes() as seen:
        out.backward(grad)
    big = sorted(name for name, size in seen.ops
                 if size == y.numel() and name not in ("view", "detach"))  # fmt: skip
    assert "mul" not in big and big.count("sum") == 1, big


def _run_separate(adapter, y, fused: bool, autocast: bool):
    """Pfeiffer on a post-norm encoder: y + G(x)·A(x) with x = LN(y), both y's paths trained."""
    adapter.zero_grad(set_to_none=True)
    y = y.detach().clone().requires_grad_(True)
    with torch.autocast(**BF16, enabled=autocast):
        x = torch.nn.functional.layer_norm(y, y.shape[-1:])
        out = adapter.residual(y, x) if fused else y + adapter(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return out.detach(), y.grad, {n: p.grad for n, p in adapter.named_parameters()}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_adapter_reading_another_tensor_gives_the_modules_results(gated, autocast):
    adapter = _bottleneck(gated=gated)
    y = torch.randn(3, 5, 16)
    out, grad_y, grads = _run_separate(adapter, y, True, autocast)
    want_out, want_y, want = _run_separate(adapter, y, False, autocast)
    close = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    assert out.dtype == want_out.dtype == torch.float32 and grad_y.dtype == torch.float32
    torch.testing.assert_close(out, want_out, **close)
    torch.testing.assert_close(grad_y, want_y, **close)
    assert grads.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name, **close)


@pytest.mark.parametrize("gated", [False, True])
def test_a_separate_input_passes_the_residuals_gradient_through(gated):
    adapter = _bottleneck(gated=gated)
    y = torch.randn(2, 4, 16, requires_grad=True)
    x = torch.randn(2, 4, 16, requires_grad=True)
    grad = torch.randn(2, 4, 16)
    grad_y, grad_x = torch.autograd.grad(adapter.residual(y, x), (y, x), grad)
    assert torch.equal(grad_y, grad)
    (want_x,) = torch.autograd.grad(y + adapter(x), x, grad)
    torch.testing.assert_close(grad_x, want_x)


def _bert_step(case, method):
    torch.manual_seed(0)
    petl = petlkit.attach(case.make(), method)
    with torch.autocast(**BF16):
        out = petl(**case.inputs)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in petl.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["adapter", "unipelt"])
def test_a_post_norm_encoder_trains_through_the_fused_adapter(bert_case, method, monkeypatch):
    """Each layer's adapter reads its layer norm's output through the fused node, and the step
    gives the plain modules' output and gradients (to bf16 rounding)."""
    import petlkit.methods.adapter as adapter_module

    node = getattr(adapter_module, "GatedResidualBottleneck" if method == "unipelt"
                   else "ResidualBottleneck")  # fmt: skip
    calls = []
    original = node.apply
    monkeypatch.setattr(node, "apply", lambda *a: calls.append(a[1] is not None) or original(*a))
    out, grads = _bert_step(bert_case, method)
    depth = len(layout_of(bert_case.make()).blocks)
    assert depth and calls == [True] * depth  # each reads x = LN(y), not the residual y
    monkeypatch.setattr(adapter_module.Bottleneck, "residual",
                        lambda self, y, x=None: y + self(y if x is None else x))  # fmt: skip
    want_out, want = _bert_step(bert_case, method)
    torch.testing.assert_close(out, want_out, rtol=2e-2, atol=2e-2)
    assert grads.keys() == want.keys() and any("adapter" in n for n in grads)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)
