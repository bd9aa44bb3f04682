"""A linear beside LoRA's adapted ones that reads their input (BERT's key beside query and value)
reads their cast of it (methods/placement.share_input_cast): under autocast that input is cast,
and its gradient accumulated and cast back, once for the whole group, with the same values."""

from __future__ import annotations

import copy

import torch

import petlkit
from petlkit.layout import layout_of
from petlkit.methods.base import innermost
from petlkit.methods.lora import LoRAConfig, _siblings
from petlkit.methods.placement import read_shared_cast, unshare_input_cast


def _names(petl):
    block = layout_of(petl.model).blocks[0]
    return block.query, block.attn_linears[1], block.value  # q, k, v


def _capture(module, seen: list):
    return module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))


def _hooked(petl, name) -> bool:
    module = petl.model.get_submodule(name)
    return any(h is read_shared_cast for h in module._forward_pre_hooks.values())


def _perturb(petl):
    with torch.no_grad():
        for name, p in petl.named_parameters():
            if "lora_B" in name:
                p.normal_()


def test_the_key_reads_the_cast_the_query_and_value_read(bert_case):
    petl = petlkit.attach(bert_case.make(), "lora")
    q, k, v = _names(petl)
    seen_q, seen_k, seen_v = [], [], []
    _capture(innermost(petl.model.get_submodule(q)), seen_q)
    _capture(petl.model.get_submodule(k), seen_k)
    _capture(innermost(petl.model.get_submodule(v)), seen_v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        petl(**bert_case.inputs)
    assert seen_k[0].dtype == torch.bfloat16
    assert seen_k[0] is seen_q[0] and seen_k[0] is seen_v[0]  # one cast for the three


def _step(petl, inputs, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = petl(**inputs)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in petl.named_parameters() if p.grad is not None}


def test_outputs_and_gradients_are_those_without_the_shared_cast(bert_case):
    for autocast in (False, True):
        shared = petlkit.attach(bert_case.make(), "lora")
        _perturb(shared)
        alone = copy.deepcopy(shared)
        unshare_input_cast(alone.model.get_submodule(_names(alone)[1]))
        assert _hooked(shared, _names(shared)[1]) and not _hooked(alone, _names(alone)[1])
        got, got_grads = _step(shared, bert_case.inputs, autocast)
        want, want_grads = _step(alone, bert_case.inputs, autocast)
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same cast values
        assert got_grads.keys() == want_grads.keys() and len(got_grads) > 4
        # under autocast the key's input gradient now meets the others' in bf16, not float32
        close = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-6, "atol": 1e-7}
        for name, grad in got_grads.items():
            torch.testing.assert_close(grad, want_grads[name], msg=name, **close)


def test_removing_the_method_removes_the_shared_cast_once_no_lora_needs_it(bert_case):
    plain = bert_case.make()
    petl = petlkit.attach(copy.deepcopy(plain), "lora")
    key = _names(petl)[1]
    petl.add_method(LoRAConfig(r=2), name="second")
    assert _hooked(petl, key)
    petl.remove_method("default")
    assert _hooked(petl, key)  # the second LoRA's q and v still read the shared cast
    petl.remove_method("second")
    assert not _hooked(petl, key)
    assert not petl.model.get_submodule(key)._forward_pre_hooks


def test_fused_projections_and_mlp_siblings():
    """No sibling beside a fused q|k|v; LLaMA-style gate and up read one cast when LoRA adapts
    only one of them."""
    assert _siblings(_Layout([("qkv",)]), ["qkv"]) == []
    layout = _Layout([("q", "k", "v"), ("gate", "up")])
    assert _siblings(layout, ["q", "v", "up"]) == ["k", "gate"]
    assert _siblings(layout, ["gate"]) == ["up"]


class _Layout:
    def __init__(self, groups):
        attn, *mlp = groups
        block = type(
            "Block",
            (),
            {
                "site": lambda self, kind: (
                    "",
                    attn if kind == "attn_in" else (mlp[0] if mlp else ()),
                )
            },
        )
        self.blocks = [block(), block()]
