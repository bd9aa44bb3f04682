"""A block's separate q, k and v linears as one node under UniPELT (methods/projections.py): the
same outputs and gradients as each linear and LoRA update alone, used where autocast casts the
frozen weights, and undone by detach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import petlkit
from petlkit.methods.projections import JointProjections, SharedProjection
from tests.helpers import attached_and_perturbed, tiny_llama

SIZES, RANK, WIDTH = (6, 4, 4), 3, 5  # q, then a smaller k and v (grouped-query attention)


def _tensors(bias: bool):
    torch.manual_seed(0)
    x = torch.randn(2, 3, WIDTH, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(SIZES), WIDTH, dtype=torch.float64)
    b = torch.randn(sum(SIZES), dtype=torch.float64) if bias else None
    pairs = []
    for i in (0, 2):  # LoRA on q and v
        up = torch.randn(1, SIZES[i], RANK, dtype=torch.float64, requires_grad=True)
        pairs += [torch.randn(6, RANK, dtype=torch.float64, requires_grad=True), up]
    return x, weight, b, pairs


def _alone(x, weight, bias, pairs):
    weights = weight.split(SIZES)
    biases = bias.split(SIZES) if bias is not None else [None] * 3
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    for i, (hidden, up) in zip((0, 2), (pairs[0:2], pairs[2:4]), strict=True):
        outs[i] = outs[i] + (hidden @ up[0].t()).view(*x.shape[:-1], -1)
    return outs


@pytest.mark.parametrize("bias", [True, False])
def test_the_joint_node_is_each_linear_and_update_alone(bias):
    x, weight, b, pairs = _tensors(bias)
    got = JointProjections.apply(x, weight, b, SIZES, (0, 2), 0, *pairs)
    want = _alone(x, weight, b, pairs)
    assert [o.shape[-1] for o in got] == list(SIZES)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    joint = JointProjections.apply
    torch.autograd.gradcheck(lambda x, *p: joint(x, weight, b, SIZES, (0, 2), 0, *p), (x, *pairs))


def test_the_query_has_a_storage_of_its_own():
    """Attention keeps the query for its backward: as a view it would keep the keys' and
    values' columns alive too, which the prefix's concatenation has copied."""
    x, weight, b, pairs = _tensors(True)
    q, k, v = JointProjections.apply(x, weight, b, SIZES, (0, 2), 0, *pairs)
    storage = [t.untyped_storage().data_ptr() for t in (q, k, v)]
    assert q.is_contiguous() and storage[0] not in storage[1:]
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()


def test_gradients_arriving_strided_or_missing():
    x, weight, b, pairs = _tensors(True)
    got = JointProjections.apply(x, weight, b, SIZES, (0, 2), 0, *pairs)
    # attention hands q's gradient back transposed, and k's output may go unused
    (got[0].transpose(0, 1).contiguous().transpose(0, 1).square().sum() + got[2].sum()).backward()
    mine = [x.grad.clone(), *[p.grad.clone() for p in pairs]]
    for t in (x, *pairs):
        t.grad = None
    want = _alone(x, weight, b, pairs)
    (want[0].square().sum() + want[2].sum()).backward()
    for g, t in zip(mine, (x, *pairs), strict=True):
        torch.testing.assert_close(g, t.grad)


def _joint_calls(monkeypatch) -> list:
    import petlkit.methods.gate as gate_module

    calls: list = []
    original = JointProjections.apply
    monkeypatch.setattr(gate_module.JointProjections, "apply",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    return calls


def _step(petl, inputs, autocast=True):
    petl.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = petl(**inputs)
    out = getattr(out, "logits", out)
    out.float().square().mean().backward()
    return out.detach().float(), {
        n: p.grad for n, p in petl.named_parameters() if p.grad is not None
    }


def _released(petl):
    for group in petl.methods["default"]._groups:
        group.callers = []  # the joint node off; each linear and LoRA layer computes alone
    return petl


def _check_same(got, want):
    (out, grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)  # the same bf16 GEMM values
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, grad in grads.items():  # x's gradient summed in another order, in bf16
        torch.testing.assert_close(grad, want_grads[name], rtol=3e-2, atol=3e-3, msg=name)


def _llama_case():
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    return type("Case", (), {"make": staticmethod(tiny_llama), "inputs": {"input_ids": ids}})


@pytest.mark.parametrize("name", ["bert_case", "llama"])
def test_unipelt_computes_each_blocks_q_k_v_as_one_node_under_autocast(name, request,
                                                                       monkeypatch):  # fmt: skip
    case = _llama_case() if name == "llama" else request.getfixturevalue(name)
    calls = _joint_calls(monkeypatch)
    petl = attached_and_perturbed(case, "unipelt")
    keys = [n for n, m in petl.model.named_modules() if isinstance(m, SharedProjection)]
    assert len(keys) == 2 and all(n.endswith(("key", "k_proj")) for n in keys)
    got = _step(petl, case.inputs)
    assert len(calls) == 2  # one per block
    torch.manual_seed(0)
    want = _step(_released(attached_and_perturbed(case, "unipelt")), case.inputs)
    assert len(calls) == 2
    _check_same(got, want)


def test_no_joint_node_where_nothing_is_cast_or_the_method_is_off(bert_case, monkeypatch):
    calls = _joint_calls(monkeypatch)
    petl = attached_and_perturbed(bert_case, "unipelt")
    out, _ = _step(petl, bert_case.inputs, autocast=False)  # float32: each reads its own weight
    want, _ = _step(_released(attached_and_perturbed(bert_case, "unipelt")), bert_case.inputs,
                    autocast=False)  # fmt: skip
    torch.testing.assert_close(out, want)
    plain = attached_and_perturbed(bert_case, "unipelt")
    plain.remove_method("default")  # the backbone with the same (perturbed) head
    with petl.disable(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        off, base = petl(**bert_case.inputs), plain(**bert_case.inputs)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert not calls


def test_under_activation_checkpointing(bert_case, monkeypatch):
    calls = _joint_calls(monkeypatch)
    petl = attached_and_perturbed(bert_case, "unipelt").train()
    petl.model.set_activation_checkpointing(True)
    got = _step(petl, bert_case.inputs)
    assert len(calls) == 4  # each block's forward, and again where the backward recomputes it
    want = _step(_released(attached_and_perturbed(bert_case, "unipelt")).train(),
                 bert_case.inputs)  # fmt: skip
    _check_same(got, want)


def test_removing_unipelt_gives_back_the_plain_key(bert_case):
    model = bert_case.make()
    keys = set(model.state_dict())
    petl = petlkit.attach(model, "unipelt")
    assert any(isinstance(m, SharedProjection) for m in model.modules())
    petl.remove_method("default")
    assert not any(isinstance(m, SharedProjection) for m in model.modules())
    assert set(model.state_dict()) == keys
    key = model.get_submodule("encoder.encoder.layer.0.attention.self.key")
    assert type(key) is nn.Linear and not key._forward_pre_hooks


def test_a_counted_bert_step_keeps_no_more_and_calls_less():
    """On BERT-base's shape (counted, fake tensors): the peak and the bytes kept for the
    backward are those of each linear alone, with fewer ATen calls (issue #47)."""
    from petlkit.cost.cases import build_case, count, method_model
    from petlkit.cost.step import count_step

    case = build_case("bert-base-shape", batch=2, size=16, num_classes=2)
    joint = count(case, "unipelt").totals()
    alone_model = _released(method_model(case, "unipelt"))
    alone = count_step(alone_model, case.batch, case.labels, lambda m, b: m(**b)).totals()
    assert joint["aten_calls"] < alone["aten_calls"] - 12 * 10  # at least 10 a block fewer
    for kind in ("saved_bytes", "peak_bytes"):  # within one 768 x 768 weight's bf16 copy
        assert joint[kind] <= alone[kind] + 768 * 768 * 2, kind
