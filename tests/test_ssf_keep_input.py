"""The what-if SSF form that benchmarks/ssf_keep_input.py counts (the attention projection keeps
its input and makes its output again backward) computes today's SSF: its counts compare two
forms of the same function."""

from __future__ import annotations

import torch

import petlkit
from petlkit.methods import ssf
from tests.helpers import benchmark_script


def _step(vit_case):
    torch.manual_seed(0)
    petl = petlkit.attach(vit_case.make(), "ssf")
    out = petl(**vit_case.inputs)
    (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
    grads = {n: p.grad for n, p in petl.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_the_counted_variant_gives_todays_outputs_and_gradients(vit_case, monkeypatch):
    script = benchmark_script("ssf_keep_input")
    out, grads = _step(vit_case)
    calls = []
    original = script.KeepsInput.apply
    monkeypatch.setattr(script.KeepsInput, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(ssf, "_ScaledLinear", script.OnProjections)
    variant_out, variant_grads = _step(vit_case)
    depth = 2  # the tiny ViT's blocks: one attention projection each
    assert len(calls) == depth
    torch.testing.assert_close(variant_out, out)
    assert variant_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(variant_grads[name], grad, msg=name)
