"""UniPELT's gates that read one block's attention input run as one batched gate (methods/gate.py):
the same outputs and gradients as each gate alone, in a forward, under activation checkpointing
and outside a forward."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.cost.cases import FLOOR, count
from petlkit.methods.gate import Gate
from tests.helpers import attached_and_perturbed


def _unipelt(case):
    return attached_and_perturbed(case, "unipelt")


def _alone(petl):
    for group in petl.methods["default"]._groups:
        group.release()
    return petl


def _step(petl, case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    petl.zero_grad(set_to_none=True)
    out = petl(**case.inputs)
    out = getattr(out, "logits", out)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in petl.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["vit_case", "bert_case"])
def test_grouped_gates_give_each_gates_outputs_and_gradients(name, request):
    case = request.getfixturevalue(name)
    grouped = _unipelt(case)
    assert grouped.methods["default"]._groups  # LoRA's and the prefix's gates share each block
    out, grads = _step(grouped, case)
    want_out, want = _step(_alone(_unipelt(case)), case)
    torch.testing.assert_close(out, want_out)
    assert grads.keys() == want.keys()
    for name_, grad in grads.items():
        torch.testing.assert_close(grad, want[name_], msg=name_)


def test_grouped_gates_under_activation_checkpointing(vit_case):
    petl = _unipelt(vit_case).train()
    want_out, want = _step(_alone(_unipelt(vit_case)).train(), vit_case)
    petl.model.set_activation_checkpointing(True)
    out, grads = _step(petl, vit_case)
    torch.testing.assert_close(out, want_out)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_a_gate_called_outside_a_forward_computes_alone(vit_case):
    petl = _unipelt(vit_case)
    _step(petl, vit_case)
    gate = petl.methods["default"]._groups[0].gates[0]  # the one that starts a group's work
    h = torch.randn(2, 5, gate.linear.in_features)
    for _ in range(2):  # the same input twice, a backward each time: nothing cached between
        gate(h).sum().backward()
    assert gate.linear.weight.grad is not None


def test_one_gate_computation_per_block_and_detach_releases_the_groups(vit_case):
    from tests.test_cost_methods import _vit_case

    added = {depth: count(_vit_case(depth), "unipelt").by_op()["aten.sigmoid"]["calls"]
             - count(_vit_case(depth), FLOOR).by_op().get("aten.sigmoid", {}).get("calls", 0)
             for depth in (2, 4)}  # fmt: skip
    assert (added[4] - added[2]) // 2 == 2  # the attention input's group, the adapter's gate
    model = vit_case.make()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    petl = petlkit.attach(model, "unipelt")
    inner, method = petl.model, petl.methods["default"]
    gates = [m for m in method.modules() if isinstance(m, Gate)]
    assert any("_group" in g.__dict__ for g in gates)
    petl.remove_method("default")
    assert (len(inner._forward_pre_hooks), len(inner._forward_hooks)) == hooks
    assert not any("_group" in g.__dict__ for g in gates)
