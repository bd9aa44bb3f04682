"""Full fine-tuning without its copy of the pretrained weights (`keep_pretrained=False`): one
backbone's worth of memory less, trains as with the copy, and refuses, before anything changes,
whatever would need the pretrained weights back."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.checkpoint import save_adapter
from petlkit.cost.cases import build_case, count
from tests.helpers import train_steps


def test_without_the_copy_it_holds_one_backbone_less_and_trains_the_same(vit_case):
    torch.manual_seed(0)
    kept = petlkit.attach(vit_case.make(), "full")
    torch.manual_seed(0)
    lean = petlkit.attach(vit_case.make(), "full", keep_pretrained=False)
    backbone = sum(p.numel() * p.element_size() for n, p in kept.model.named_parameters()
                   if not n.startswith("head"))  # fmt: skip
    held = lambda petl: sum(b.numel() * b.element_size() for b in petl.buffers())  # noqa: E731
    assert held(kept) - held(lean) > 0.9 * backbone  # the copy (all but the head)
    train_steps(kept, vit_case.inputs, vit_case.labels, steps=2)
    train_steps(lean, vit_case.inputs, vit_case.labels, steps=2)
    for (name, a), b in zip(kept.model.named_parameters(), lean.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_bypassing_it_is_refused_before_any_method_is_bypassed(vit_case):
    petl = petlkit.attach(vit_case.make(), "lora")
    petl.add_method(petlkit.make_config("full", keep_pretrained=False), name="tuned")
    petl.set_active("default", "tuned")
    with pytest.raises(petlkit.PetlError, match="keep_pretrained=True"), petl.disable():
        pass
    with pytest.raises(petlkit.PetlError, match="cannot be bypassed"):
        petl.set_active("default")
    assert petl.active == ["default", "tuned"]
    assert all(m.enabled for m in petl.methods.values())  # nothing was bypassed on the way


def test_removing_it_leaves_the_fine_tuned_weights_and_saving_works(vit_case, tmp_path):
    petl = petlkit.attach(vit_case.make(), "full", keep_pretrained=False)
    train_steps(petl, vit_case.inputs, vit_case.labels, steps=1)
    trained = {n: p.detach().clone() for n, p in petl.model.named_parameters()}
    save_adapter(petl, tmp_path / "adapter")  # the backbone's fingerprint needs no bypass
    petl.remove_method("default")
    for name, p in petl.model.named_parameters():
        torch.testing.assert_close(p, trained[name], msg=name)


def test_the_counter_shows_the_copy_in_resident_memory():
    case = build_case("vit-tiny", batch=2, size=32)
    kept = count(case, "full").resident_bytes
    lean = count(case, "full", {"keep_pretrained": False}).resident_bytes
    weights = sum(p.numel() * 4 for n, p in case.model.named_parameters() if "head" not in n)
    assert kept - lean == pytest.approx(weights, rel=0.01)
