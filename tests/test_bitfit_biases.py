"""BitFit forms every layer's bias b + δ in one foreach add per forward of the model: the same
outputs and gradients as one add per layer, in every way a model is run."""

from __future__ import annotations

import copy

import torch

import petlkit
from petlkit.methods.base import Tuner


def _model(vit_case):
    petl = petlkit.attach(vit_case.make(), "bitfit")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return petl


def _loss(petl, vit_case) -> torch.Tensor:
    return petl(**vit_case.inputs).float().square().mean()


def _grads(petl) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in petl.named_parameters() if p.grad is not None}


def _per_layer(petl):
    """The same model with the group switched off: each layer forms its own b + δ."""
    for m in petl.modules():
        if isinstance(m, Tuner):
            m.__dict__["_group"] = None
    return petl


def test_grouped_biases_give_the_per_layer_outputs_and_gradients(vit_case):
    grouped, plain = _model(vit_case), _per_layer(_model(vit_case))
    for petl in (grouped, plain):
        _loss(petl, vit_case).backward()
    torch.testing.assert_close(grouped(**vit_case.inputs), plain(**vit_case.inputs))
    want = _grads(plain)
    assert want and _grads(grouped).keys() == want.keys()
    for name, grad in _grads(grouped).items():
        torch.testing.assert_close(grad, want[name], msg=name)


def test_accumulating_gradients_over_forwards_and_steps_follows_new_values(vit_case):
    petl = _model(vit_case)
    _loss(petl, vit_case).backward()
    once = _grads(petl)
    _loss(petl, vit_case).backward()  # a second forward and backward, no step between
    for name, grad in _grads(petl).items():
        torch.testing.assert_close(grad, 2 * once[name], msg=name)
    before = petl(**vit_case.inputs)
    with torch.no_grad():
        petl.model.blocks[0].mlp.fc2.bias_delta.add_(torch.randn(32))  # a step, in place
    assert not torch.allclose(petl(**vit_case.inputs), before)


def test_a_layer_run_alone_a_copy_and_a_checkpointed_model_form_their_own_biases(vit_case):
    petl = _model(vit_case)
    _loss(petl, vit_case).backward()
    fc2 = petl.model.blocks[0].mlp.fc2
    x = torch.randn(2, 3, fc2.weight.shape[1])
    alone = fc2(x)  # outside the model's forward: its own b + δ, a graph of its own
    torch.testing.assert_close(alone, fc2.base_layer(x) + fc2.bias_delta)
    alone.sum().backward()
    twin = copy.deepcopy(petl)
    with torch.no_grad():
        twin.model.blocks[0].mlp.fc2.bias_delta.add_(torch.randn(32))
    twin(**vit_case.inputs)
    torch.testing.assert_close(petl(**vit_case.inputs), _model(vit_case)(**vit_case.inputs))
    plain = _model(vit_case)
    _loss(plain, vit_case).backward()
    petl.zero_grad(set_to_none=True)
    petl.model.set_activation_checkpointing(True)
    petl.train()
    _loss(petl, vit_case).backward()
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(petl)[name], grad, msg=name)


def test_removing_bitfit_removes_its_hooks(vit_case):
    model = vit_case.make()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    petl = petlkit.attach(model, "bitfit")
    inner = petl.model
    petl.remove_method("default")
    assert (len(inner._forward_pre_hooks), len(inner._forward_hooks)) == hooks
