"""A block's LoRA down-projections and UniPELT gates as one node (methods/grouped_down.py): the
function of each part alone, exact gradients (float64 gradcheck), any output left unused, and
UniPELT's LoRA layers reading their gated hidden from it."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.layout import layout_of
from petlkit.methods.grouped_down import GroupedDown
from petlkit.methods.lora_update import LinearLoRAUp, LoRAUp

BATCH, TOKENS, WIDTH, RANK = 2, 3, 5, 2
LORAS, OTHERS = (1, 2), (1,)  # a plain LoRA, a fused one with two parts, a prefix-like gate


def _tensors(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(BATCH, TOKENS, WIDTH, dtype=dtype)
    downs = [torch.randn(n * RANK, WIDTH, dtype=dtype) for n in LORAS]
    gate_weights = [torch.randn(n, WIDTH, dtype=dtype) for n in (*LORAS, *OTHERS)]
    biases = [torch.randn(n, dtype=dtype) for n in (*LORAS, *OTHERS)]
    return [t.requires_grad_() for t in (x, *downs, *gate_weights, *biases)]


def _alone(causal, x, *tensors):
    """Each part as the methods compute it alone: LoRA's h ⊙ G per part, the gate's σ mean."""
    downs, rest = tensors[: len(LORAS)], tensors[len(LORAS) :]
    gates_w, biases = rest[: len(LORAS) + len(OTHERS)], rest[len(LORAS) + len(OTHERS) :]
    gates = []
    for w, b in zip(gates_w, biases, strict=True):
        s = torch.sigmoid(x @ w.T + b)
        gates.append(s if causal else s.mean(1, keepdim=True))
    outputs = []
    for n, down, g in zip(LORAS, downs, gates, strict=False):
        h = (x @ down.T).unflatten(-1, (n, RANK)) * g.unsqueeze(-1)
        outputs.append(h.flatten(-2).reshape(-1, n * RANK))
    for g in gates[len(LORAS) :]:
        outputs.append(g if causal else g.squeeze(1))
    return outputs


@pytest.mark.parametrize("causal", [False, True])
def test_the_grouped_node_is_each_part_alone(causal):
    tensors = _tensors()
    got = GroupedDown.apply(tensors[0], (LORAS, RANK, OTHERS), causal, *tensors[1:])
    want = _alone(causal, *tensors)
    assert len(got) == len(want) == len(LORAS) + len(OTHERS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("causal", [False, True])
def test_the_grouped_nodes_gradients_are_exact(causal):
    tensors = _tensors()

    def run(*ts):
        return GroupedDown.apply(ts[0], (LORAS, RANK, OTHERS), causal, *ts[1:])

    assert torch.autograd.gradcheck(run, tensors)


@pytest.mark.parametrize("unused", [0, 1, 2])
def test_an_unused_output_gives_no_gradient_through_it(unused):
    tensors, reference = _tensors(), _tensors()
    got = GroupedDown.apply(tensors[0], (LORAS, RANK, OTHERS), False, *tensors[1:])
    want = _alone(False, *reference)
    loss = sum(o.square().sum() for i, o in enumerate(got) if i != unused)
    ref = sum(o.square().sum() for i, o in enumerate(want) if i != unused)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    expected = torch.autograd.grad(ref, reference, allow_unused=True)
    for i, (g, e) in enumerate(zip(grads, expected, strict=True)):
        if e is None:  # a part only the unused output reads: a zero gradient, or none
            assert g is None or not g.any(), i
        else:
            torch.testing.assert_close(g, e, msg=str(i))


def test_the_up_node_gives_addmms_gradients():
    torch.manual_seed(1)
    out = torch.randn(BATCH, TOKENS, 4, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(BATCH * TOKENS, RANK, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, RANK, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LoRAUp.apply, (out, hidden, up))
    strided = torch.randn(BATCH, 4, TOKENS, dtype=torch.float64).transpose(1, 2)
    (grad_out, *_) = torch.autograd.grad(LoRAUp.apply(out, hidden, up), (out, hidden), strided)
    assert grad_out.is_contiguous() and torch.equal(grad_out, strided)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trained", [False, True])
def test_the_linear_and_up_node_is_the_layer_plus_the_update(bias, trained):
    """x·Wᵀ + b + hidden·upᵀ: the values and float64 gradients of F.linear plus the update; W
    and b get gradients only when they are trained."""
    torch.manual_seed(2)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(BATCH, TOKENS, WIDTH, **f64, requires_grad=True)
    weight = torch.randn(4, WIDTH, **f64, requires_grad=trained)
    b = torch.randn(4, **f64, requires_grad=trained) if bias else None
    hidden = torch.randn(BATCH * TOKENS, RANK, **f64, requires_grad=True)
    up = torch.randn(4, RANK, **f64, requires_grad=True)
    got = LinearLoRAUp.apply(x, weight, b, hidden, up)
    want = torch.nn.functional.linear(x, weight, b) + (hidden @ up.T).view(BATCH, TOKENS, 4)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(LinearLoRAUp.apply, (x, weight, b, hidden, up))
    grads = torch.autograd.grad(got.square().sum(), (x, hidden, up))
    torch.testing.assert_close(grads, torch.autograd.grad(want.square().sum(), (x, hidden, up)))
    strided = torch.randn(BATCH, 4, TOKENS, **f64).transpose(1, 2)  # as attention's arrive
    got = LinearLoRAUp.apply(x, weight, b, hidden, up)
    torch.testing.assert_close(torch.autograd.grad(got, x, strided)[0], strided @ weight)


def test_only_a_layer_that_is_exactly_f_linear_is_computed_inside_a_node():
    from petlkit.methods.linears import plain_linear
    from petlkit.methods.placement import CastLinear

    layer = torch.nn.Linear(3, 2)
    assert plain_linear(layer) is layer
    assert plain_linear(CastLinear(3, 2)) is None  # a subclass may compute something else
    own = torch.nn.Linear(3, 2)
    own.forward = lambda x: x  # an instance's own forward
    assert plain_linear(own) is None
    handle = layer.register_forward_pre_hook(lambda m, a: None)
    assert plain_linear(layer) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert plain_linear(layer) is None  # a global hook sees every module's call
    finally:
        handle.remove()
    assert plain_linear(layer) is layer


def _count_calls(monkeypatch, **nodes) -> dict[str, int]:
    """Each autograd Function's `apply` counted under its key (the counts fill as it runs)."""
    calls = dict.fromkeys(nodes, 0)
    for key, node in nodes.items():
        original = node.apply

        def counted(*args, key=key, original=original):
            calls[key] += 1
            return original(*args)

        monkeypatch.setattr(node, "apply", counted)
    return calls


@pytest.mark.parametrize("name", ["bert_case", "vit_case"])
def test_unipelts_lora_computes_its_plain_layer_in_its_own_node(name, request, monkeypatch):
    """UniPELT's LoRA layer on a plain nn.Linear runs the layer and its update as one node
    (`LinearLoRAUp`); a layer with a hook is called as it is (`LoRAUp` on its output); both
    give the same outputs and gradients."""
    import petlkit.methods.lora as lora_module

    case = request.getfixturevalue(name)
    calls = _count_calls(monkeypatch, fused=lora_module.LinearLoRAUp, apart=lora_module.LoRAUp)
    padded = _count_calls(monkeypatch, matrix=lora_module._PartsUp)
    results = []
    for hooked in (False, True):
        torch.manual_seed(0)
        petl = petlkit.attach(case.make(), "unipelt")
        layers = [m for m in petl.modules() if isinstance(m, lora_module.LoRALinear)]
        for layer in layers:
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # a non-zero update
            if hooked:
                layer.base_layer.register_forward_hook(lambda m, a, out: out)
        out = petl(**case.inputs)
        loss = getattr(out, "logits", out).float().square().mean()
        loss.backward()
        trained = [p.grad for p in petl.parameters() if p.requires_grad and p.grad is not None]
        results.append((loss.detach(), trained))
        assert calls == ({"fused": 0, "apart": len(layers)} if hooked
                         else {"fused": len(layers), "apart": 0})  # fmt: skip
        fused_qkv = any(layer.parts is not None for layer in layers)  # the ViT's q|k|v
        # a plain fused layer writes its parts by one batched GEMM: no zero-padded matrix
        assert padded["matrix"] == (len(layers) if hooked and fused_qkv else 0)
        calls.update(fused=0, apart=0)
        padded.update(matrix=0)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("name", ["bert_case", "vit_case"])
def test_unipelts_lora_reads_its_hidden_from_one_node_per_block(name, request, monkeypatch):
    import petlkit.methods.gate as gate_module
    import petlkit.methods.lora as lora_module

    case = request.getfixturevalue(name)
    calls = _count_calls(monkeypatch, grouped=gate_module.GroupedDown,
                         alone=lora_module.GatedLoRAUpdate)  # fmt: skip
    petl = petlkit.attach(case.make(), "unipelt")
    out = petl(**case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    assert calls == {"grouped": len(layout_of(case.make()).blocks), "alone": 0}
    lora_a = [p for n, p in petl.named_parameters() if n.endswith("lora_A")]
    assert lora_a and all(p.grad is not None for p in lora_a)
