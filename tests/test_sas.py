"""SaS: budget, exact start, what trains, merge, the ablation switches, hypernetwork caching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit import NotMergeableError
from petlkit.backbones import vit
from tests.helpers import snapshot, train_steps


def _perturb(model) -> None:
    """Give every SaS parameter a non-trivial value (zero-init parts included)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.methods["default"].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_default_budget_on_vit_b16_is_under_0_05_percent():
    model = petlkit.attach(vit("vit_base", num_classes=100), "sas")
    count = model.trainable_parameters()
    assert count.backbone == 85_798_656  # ViT-B/16 at 224 px, head excluded
    # shared 2·(768·4 + 4·768) + hypernetworks 2·(8·8+8 + 8·1536+1536) + embeddings 12·8
    assert count.trainable == 12_288 + 27_792 + 96 == 40_176
    assert count.percent <= 0.05


@pytest.mark.parametrize("kind", ["vit_case", "bert_case"])
def test_step_zero_equals_the_backbone_exactly(kind, request):
    case = request.getfixturevalue(kind)
    model = petlkit.attach(case.make(), "sas")
    assert torch.equal(model(**case.inputs), case.make()(**case.inputs))


def test_layer_embeddings_start_distinct_at_the_documented_scale(vit_case):
    """e_l ~ N(0, 1/k): each layer starts with its own embedding, so the hypernetwork can tell
    the layers apart from the first step (docs/methods/sas.md, "Initialisation")."""
    torch.manual_seed(0)
    k = 64
    e = petlkit.attach(vit_case.make(), "sas", embed_dim=k).methods["default"].layer_embeddings
    assert e.shape == (2, k) and not torch.allclose(e[0], e[1])
    assert 0.8 < e.std().item() * math.sqrt(k) < 1.2 and abs(e.mean().item()) < 0.5 / math.sqrt(k)


def test_all_parts_train_and_layers_differ(bert_case):
    model = petlkit.attach(bert_case.make(), "sas")
    before = snapshot(model)
    train_steps(model, bert_case.inputs, bert_case.labels, steps=4)
    sas = model.methods["default"]
    for name, p in sas.named_parameters():
        assert not torch.equal(p, before[f"methods.default.{name}"]), f"{name} did not change"
    scale, shift = sas.generate()["attn_in"]
    assert not torch.allclose(scale[0], scale[1]) and not torch.allclose(shift[0], shift[1])


@pytest.mark.parametrize("kind", ["vit_case", "bert_case"])
def test_merge_matches_unmerged_with_nontrivial_parameters(kind, request):
    case = request.getfixturevalue(kind)
    model = petlkit.attach(case.make(), "sas", scale=0.5)
    _perturb(model)
    expected = model(**case.inputs)
    original = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.merge()
    assert not model.model._forward_pre_hooks, "merge must leave no hooks"
    assert (model(**case.inputs) - expected).abs().max() <= 1e-5
    model.unmerge()
    for key, value in original.items():
        assert torch.equal(model.model.state_dict()[key], value), key
    assert torch.equal(model(**case.inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_in_the_merge_dtype_itself(vit_case, dtype):
    """A float64 model (and float32 on Apple MPS) merges in its own dtype, so the weight the
    merge reads is the very tensor it overwrites: the bias must be folded from the original."""
    model = petlkit.attach(vit_case.make().to(dtype), "sas", scale=0.5)
    _perturb(model)
    inputs = {k: v.to(dtype) for k, v in vit_case.inputs.items()}
    with torch.no_grad():
        expected = model(**inputs)
        model.merge()
        torch.testing.assert_close(model(**inputs), expected)


@pytest.mark.parametrize("order", [("sas", "lora"), ("lora", "sas")])
def test_merge_with_lora_on_the_same_linears_folds_lora_first(bert_case, order):
    """LoRA wraps q/k/v, SaS transforms their input: PetlModel.merge folds LoRA into W first,
    then SaS into W + BA, whatever the attach order; SaS alone over a wrapped linear refuses."""
    model = petlkit.attach(bert_case.make(), order[0], name=order[0])
    petlkit.attach(model, order[1], name=order[1])
    model.set_active(*order)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        expected = model(**bert_case.inputs)
        with pytest.raises(NotMergeableError, match="another method wraps"):
            model.methods["sas"].merge(model.model)
        model.merge()
        torch.testing.assert_close(model(**bert_case.inputs), expected, rtol=0, atol=1e-5)
        model.unmerge()
        torch.testing.assert_close(model(**bert_case.inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("switches", "expected"),
    [({"shared": True, "specific": False}, {"down", "up"}),
     ({"shared": False, "specific": True}, {"hyper", "layer_embeddings"}),
     ({}, {"down", "up", "hyper", "layer_embeddings"})],
)  # fmt: skip
def test_ablation_switches_train_and_round_trip(vit_case, switches, expected, tmp_path):
    model = petlkit.attach(vit_case.make(), "sas", **switches)
    names = {n for n, _ in model.methods["default"].named_parameters()}
    assert {part for part in expected if any(part in n for n in names)} == expected
    assert not any(part in n for n in names for part in {"down", "hyper"} - expected)
    before = model(**vit_case.inputs)
    train_steps(model, vit_case.inputs, vit_case.labels)
    assert not torch.allclose(model(**vit_case.inputs), before)
    petlkit.save_adapter(model, tmp_path)
    loaded = petlkit.load_adapter(vit_case.make(), tmp_path)
    assert torch.equal(loaded(**vit_case.inputs), model(**vit_case.inputs))


def test_both_switches_off_is_rejected():
    with pytest.raises(petlkit.ConfigError, match="both off"):
        petlkit.make_config("sas", shared=False, specific=False)


def test_hypernetwork_runs_once_per_forward_and_is_cached_in_inference(vit_case):
    model = petlkit.attach(vit_case.make(), "sas")
    sas = model.methods["default"]
    calls = []
    for module in sas.site_modules.values():
        module.hyper.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    model(**vit_case.inputs)
    assert len(calls) == 2  # one per site kind, not per block or per token
    model.eval()
    with torch.no_grad():
        model(**vit_case.inputs)
        model(**vit_case.inputs)
    assert len(calls) == 4  # computed once, then served from the cache
    with torch.no_grad():
        sas.site_modules["mlp_in"].hyper[2].bias.add_(0.1)  # a weight change invalidates it
        changed = model(**vit_case.inputs)
    assert len(calls) == 6
    model.train()
    assert torch.allclose(model(**vit_case.inputs), changed)


def test_non_reentrant_gradient_checkpointing_gives_the_same_gradients(bert_case):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = petlkit.attach(bert_case.make(), "sas")
        _perturb(model)
        if checkpointing:
            model.model.encoder.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        F.cross_entropy(model(**bert_case.inputs), bert_case.labels).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)
