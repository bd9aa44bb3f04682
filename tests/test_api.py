"""The method API: configs, targeting, named instances, checkpoints' safety checks."""

from __future__ import annotations

import json

import pytest
import torch

import petlkit
from petlkit import CheckpointError, ConfigError, PetlError, TargetError
from petlkit.methods.lora import LoRALinear
from tests.helpers import train_steps


def test_config_round_trips_through_json():
    config = petlkit.make_config("lora", r=4, targets=["query", "value"])
    again = petlkit.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.targets == ("query", "value")


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("lora", {"r": -1}, "r must be a positive integer"),
        ("lora", {"alpha": float("nan")}, "alpha must be a finite number"),
        ("lora", {"qkv_parts": ["x"]}, "qkv_parts must be one of"),
        ("adapter", {"placement": "middle"}, "placement must be one of"),
        ("adapter", {"reduction_factor": 0}, "reduction_factor must be a positive integer"),
    ],
)
def test_bad_config_values_are_rejected(method, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        petlkit.make_config(method, **kwargs)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; valid methods: \[.*'lora'"):
        petlkit.make_config("lorra")


def test_unknown_config_keys_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        config = petlkit.config_from_dict({"method": "lora", "r": 2, "rank": 9})
    assert config.r == 2


def test_targets_by_suffix_and_regex(bert_case):
    by_suffix = petlkit.attach(bert_case.make(), "lora", targets=["query", "value"])
    by_regex = petlkit.attach(bert_case.make(), "lora", targets=r".*layer\.1\..*\.query")
    n_suffix = sum(isinstance(m, LoRALinear) for m in by_suffix.modules())
    n_regex = sum(isinstance(m, LoRALinear) for m in by_regex.modules())
    assert (n_suffix, n_regex) == (4, 1)


def test_targets_matching_nothing_list_candidates(bert_case):
    with pytest.raises(TargetError, match=r"match no Linear.*candidates.*self\.query"):
        petlkit.attach(bert_case.make(), "lora", targets=["q_proj"])


def test_lora_on_fused_qkv_updates_only_q_and_v(vit_case):
    model = petlkit.attach(vit_case.make(), "lora", r=2)
    layer = model.model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B.normal_()
    d_weight, _ = layer.delta()
    dim = layer.base_layer.in_features
    assert d_weight[dim : 2 * dim].abs().max() == 0  # k untouched
    assert d_weight[:dim].abs().max() > 0
    assert d_weight[2 * dim :].abs().max() > 0


def test_named_methods_switch_and_remove(vit_case):
    base = vit_case.make()
    model = petlkit.attach(base, "lora", name="a", r=2)
    petlkit.attach(model, "adapter", name="b")
    assert model.active == ["b"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    train_steps(model, vit_case.inputs, vit_case.labels)
    out_b = model(**vit_case.inputs)
    model.set_active("a")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not torch.allclose(model(**vit_case.inputs), out_b)
    model.remove_method("a")
    model.remove_method("b")
    assert list(model.methods) == [] and not any("base_layer" in n for n, _ in base.named_modules())
    reference = vit_case.make()
    reference.head.load_state_dict(base.head.state_dict())  # the head trained; the rest is back
    torch.testing.assert_close(
        model(**vit_case.inputs), reference(**vit_case.inputs), rtol=0, atol=0
    )
    with pytest.raises(PetlError, match="no method named 'a'; attached: \\[\\]"):
        model.set_active("a")


def test_parameter_count_excludes_head(vit_case):
    model = petlkit.attach(vit_case.make(), "linear")
    count = model.trainable_parameters()
    assert count.trainable == 0 and count.head == 32 * 3 + 3
    assert count.backbone == sum(p.numel() for p in vit_case.make().parameters()) - count.head


def test_removing_a_method_another_one_wraps_keeps_the_outer_one(vit_case):
    """LoRA "b" wraps the same linears as LoRA "a": removing "a" splices its wrappers out from
    under "b", and the model computes exactly what "b" alone computes."""
    model = petlkit.attach(vit_case.make(), "lora", name="a", r=2)
    petlkit.attach(model, "lora", name="b", r=2)
    model.set_active("a", "b")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    both = model(**vit_case.inputs)
    model.set_active("b")  # "a" bypassed in place
    expected = model(**vit_case.inputs)
    assert not torch.allclose(both, expected)  # "a" did contribute
    model.remove_method("a")
    assert list(model.methods) == ["b"] and model.active == ["b"]
    owners = [m.owner for m in model.modules() if isinstance(m, LoRALinear)]
    assert owners and set(owners) == {"b"}
    torch.testing.assert_close(model(**vit_case.inputs), expected, rtol=0, atol=0)


def test_saving_a_merged_model_asks_to_unmerge_first(vit_case, tmp_path):
    model = petlkit.attach(vit_case.make(), "lora", r=2)
    model.merge()
    with pytest.raises(PetlError, match=r"merged: call unmerge\(\) before saving"):
        petlkit.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    model.unmerge()
    petlkit.save_adapter(model, tmp_path)  # and after unmerge() it saves
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_checkpoint_for_another_backbone_is_refused(vit_case, bert_case, tmp_path):
    model = petlkit.attach(vit_case.make(), "lora", r=2)
    petlkit.save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match="saved for a VisionTransformer backbone"):
        petlkit.load_adapter(bert_case.make(), tmp_path)


def _tamper(folder, change) -> None:
    from petlkit.io import read_safetensors, write_safetensors

    tensors = read_safetensors(folder / "adapter_model.safetensors")
    change(tensors)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})


def test_a_weights_file_with_a_tensor_its_config_does_not_make_is_refused(vit_case, tmp_path):
    """An extra tensor means the file belongs to another adapter: refused, and nothing stays
    attached, rather than silently loading the part that fits."""
    petlkit.save_adapter(petlkit.attach(vit_case.make(), "lora", r=2), tmp_path)
    _tamper(tmp_path, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    model = vit_case.make()
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\].*another adapter"):
        petlkit.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_a_tensor_of_another_shape_is_refused_even_when_it_would_broadcast(vit_case, tmp_path):
    petlkit.save_adapter(petlkit.attach(vit_case.make(), "lora", r=2), tmp_path)
    name = next(k for k in petlkit.io.read_safetensors(tmp_path / "adapter_model.safetensors")
                if k.endswith("lora_A"))  # fmt: skip
    _tamper(tmp_path, lambda t: t.update({name: t[name][:1]}))  # (1, d) would fill (4, d)
    model = vit_case.make()
    with pytest.raises(
        CheckpointError,
        match=r"lora_A: saved shape \(1, 32\) != model \(4, 32\); the weights file belongs",
    ):
        petlkit.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_a_refused_weights_file_leaves_the_model_as_it_was(vit_case, tmp_path):
    """The head's bias is the wrong shape: the head's weight, checked before it, fits, but is
    not copied either."""
    trained = petlkit.attach(vit_case.make(), "bitfit")
    train_steps(trained, vit_case.inputs, vit_case.labels)
    petlkit.save_adapter(trained, tmp_path)
    _tamper(tmp_path, lambda t: t.update({"head.bias": t["head.bias"][:1]}))
    model = vit_case.make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="head.bias: saved shape"):
        petlkit.load_adapter(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_checkpoint_from_a_newer_format_is_refused(vit_case, tmp_path):
    petlkit.save_adapter(petlkit.attach(vit_case.make(), "bitfit"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer than this petlkit reads.*upgrade"):
        petlkit.load_adapter(vit_case.make(), tmp_path)


def test_truncated_weights_file_is_refused(vit_case, tmp_path):
    petlkit.save_adapter(petlkit.attach(vit_case.make(), "bitfit"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        petlkit.load_adapter(vit_case.make(), tmp_path)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(PetlError, match=r"unknown backbone 'vit-huge'.*'minilm-l6'"):
        petlkit.build_model("vit-huge", 2)


@pytest.mark.parametrize("method", ["sas", "prefix", "unipelt"])
def test_a_model_copies_after_a_training_forward(bert_case, method):
    import copy

    model = petlkit.attach(bert_case.make(), method)
    model.train()
    model(**bert_case.inputs).sum().backward()  # leaves per-forward caches with autograd history
    clone = copy.deepcopy(model).eval()
    torch.testing.assert_close(clone(**bert_case.inputs), model.eval()(**bert_case.inputs))
