"""Behaviour every method must have, on every backbone kind (PEFT-style generic tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.methods.base import Tuner
from tests.conftest import CASES, Case
from tests.helpers import snapshot, train_steps

# One small config per registered method; a new method must add itself here.
CONFIGS = {
    "full": {},
    "linear": {},
    "bitfit": {},
    "lora": {"r": 4, "alpha": 8},
    "adapter": {"placement": "houlsby", "reduction_factor": 4},
    "sas": {"rank": 2},
    "ssf": {},
    "prefix": {"length": 3, "hidden": 16},
    "prompt": {"length": 3},
    "vpt": {"length": 3},
    "unipelt": {"prefix_length": 3, "prefix_hidden": 16, "lora_r": 2, "adapter_reduction": 4},
    "unipelt-ap": {"prefix_length": 3, "prefix_hidden": 16, "adapter_reduction": 4},
    "unipelt-prompt": {
        "prefix_length": 3,
        "prefix_hidden": 16,
        "lora_r": 2,
        "adapter_reduction": 4,
        "prompt_length": 2,
    },
}
# Methods whose initial output differs from the backbone's: extra tokens shift attention, and
# SSF starts from scales drawn around 1 (the others start exactly as the backbone).
NOT_IDENTITY_AT_INIT = {"prefix", "prompt", "vpt", "unipelt", "unipelt-ap", "unipelt-prompt", "ssf"}
# Methods that work only on the project ViT.
VISION_ONLY = {"vpt"}


def test_every_registered_method_is_covered():
    assert sorted(CONFIGS) == petlkit.method_names()


PAIRS = [
    (case, method)
    for case in CASES
    for method in sorted(CONFIGS)
    if method not in VISION_ONLY or case == "tiny-vit"
]


@pytest.fixture(params=PAIRS, ids=["-".join(pair) for pair in PAIRS])
def case_method(request) -> tuple[Case, str]:
    case, method = request.param
    return CASES[case](), method


@pytest.mark.parametrize("method", sorted(VISION_ONLY))
def test_vision_only_methods_refuse_text_encoders(bert_case, method):
    with pytest.raises(petlkit.PetlError, match="needs the project ViT"):
        petlkit.attach(bert_case.make(), method, **CONFIGS[method])


def _attach(case, method):
    return petlkit.attach(case.make(), method, **CONFIGS[method])


def test_forward_backward(case_method):
    case, method = case_method
    model = _attach(case, method)
    logits = model(**case.inputs)
    assert logits.shape == (len(case.labels), 3)
    F.cross_entropy(logits, case.labels).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_starts_as_the_pretrained_model(case_method):
    case, method = case_method
    model = _attach(case, method)
    reference = case.make()
    if method in NOT_IDENTITY_AT_INIT:  # then exact only when disabled
        with model.disable():
            torch.testing.assert_close(
                model(**case.inputs), reference(**case.inputs), rtol=0, atol=0
            )
        assert not torch.allclose(model(**case.inputs), reference(**case.inputs))
        return
    torch.testing.assert_close(model(**case.inputs), reference(**case.inputs), rtol=0, atol=1e-6)


def test_only_method_parameters_change(case_method):
    case, method = case_method
    model = _attach(case, method)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, case.inputs, case.labels, steps=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    head = {n for n in trainable if ".head." in n}
    assert head and head <= changed
    method_params = trainable - head
    if method == "full":
        assert len(changed - head) > 0.5 * len(method_params)
    else:
        assert method_params == changed - head, sorted(method_params - changed)[:5]


def test_save_load_round_trip(case_method, tmp_path):
    case, method = case_method
    model = _attach(case, method)
    train_steps(model, case.inputs, case.labels)
    petlkit.save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    loaded = petlkit.load_adapter(case.make(), tmp_path)
    torch.testing.assert_close(loaded(**case.inputs), model(**case.inputs), rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_restores(case_method):
    case, method = case_method
    model = _attach(case, method)
    train_steps(model, case.inputs, case.labels)
    expected = model(**case.inputs)
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    if model.methods["default"].merge_refusal is not None:
        with pytest.raises(petlkit.NotMergeableError, match="cannot|not linear"):
            model.merge()
        return
    model.merge()
    assert not any(isinstance(m, Tuner) for m in model.modules()), "merge left wrappers"
    torch.testing.assert_close(model(**case.inputs), expected, rtol=0, atol=1e-5)
    model.unmerge()
    after = model.model.state_dict()
    assert after.keys() == weights_before.keys()
    for key, value in weights_before.items():
        assert torch.equal(after[key], value), key
    torch.testing.assert_close(model(**case.inputs), expected, rtol=0, atol=0)


def test_disable_gives_the_backbone(case_method):
    case, method = case_method
    model = _attach(case, method)
    train_steps(model, case.inputs, case.labels)
    reference = case.make()
    reference.head.load_state_dict(model.model.head.state_dict())
    trained = model(**case.inputs)
    with model.disable():
        torch.testing.assert_close(model(**case.inputs), reference(**case.inputs), rtol=0, atol=0)
    torch.testing.assert_close(model(**case.inputs), trained, rtol=0, atol=0)


DROPOUT_METHODS = {"lora": {"r": 4}, "adapter": {}, "sas": {"rank": 2}, "vpt": {"length": 3}}


@pytest.mark.parametrize("method", sorted(DROPOUT_METHODS))
def test_a_methods_dropout_acts_in_training_only(vit_case, method):
    """`dropout` changes training forwards (a new mask each time) and leaves evaluation exactly
    as without it. The tiny ViT has no dropout of its own, so any randomness is the method's."""
    models = {}
    for p in (0.0, 0.5):
        torch.manual_seed(3)
        models[p] = petlkit.attach(vit_case.make(), method, dropout=p, **DROPOUT_METHODS[method])
        torch.manual_seed(4)
        with torch.no_grad():  # non-zero updates everywhere, the same in both models
            for param in models[p].parameters():
                if param.requires_grad:
                    param.copy_(0.3 * torch.randn_like(param))
    plain, dropped = models[0.0], models[0.5]
    plain.train(), dropped.train()
    assert torch.equal(plain(**vit_case.inputs), plain(**vit_case.inputs))
    first, second = dropped(**vit_case.inputs), dropped(**vit_case.inputs)
    assert not torch.allclose(first, second)
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(**vit_case.inputs), plain(**vit_case.inputs))


MERGEABLE = ("bitfit", "full", "linear", "lora", "sas", "ssf")
MERGE_PAIRS = [(case, method) for case in CASES for method in MERGEABLE]


@pytest.mark.parametrize(("case_name", "method"), MERGE_PAIRS)
def test_disable_and_remove_on_a_merged_model(case_name, method):
    """disable() on a merged model gives the backbone and leaves it merged afterwards;
    remove_method() on a merged model restores the backbone's own weights."""
    case = CASES[case_name]()
    model = _attach(case, method)
    train_steps(model, case.inputs, case.labels)
    model.eval()
    reference = case.make().eval()
    reference.head.load_state_dict(model.model.head.state_dict())
    with torch.no_grad():
        trained = model(**case.inputs)
        model.merge()
        with model.disable():
            torch.testing.assert_close(model(**case.inputs), reference(**case.inputs),
                                       rtol=0, atol=0)  # fmt: skip
        assert not any(isinstance(m, Tuner) for m in model.model.modules())  # merged again
        torch.testing.assert_close(model(**case.inputs), trained, rtol=0, atol=1e-5)
        model.remove_method("default")
        backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("head")}
        for key, value in model.model.state_dict().items():
            if key in backbone:
                assert torch.equal(value, backbone[key]), key
