"""UniPELT, its gates and its parts: the arithmetic, the variants, the counts in the docs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.backbones.extensions import add_extra_kv
from petlkit.methods.adapter import AdapterTuner
from petlkit.methods.lora import LoRALinear
from tests.conftest import minilm_case
from tests.helpers import snapshot, train_steps

SMALL = {"prefix_length": 3, "prefix_hidden": 16, "lora_r": 2, "adapter_reduction": 4}


def _zero_gates(petl) -> int:
    zeroed = 0
    with torch.no_grad():
        for name, p in petl.named_parameters():
            if ".gate" in name:
                p.zero_()
                zeroed += 1
    return zeroed


def _copy_part_parameters(source, target) -> None:
    """Copy every non-gate trained tensor of `source`'s method into `target`'s, by name."""
    src = {n: p for n, p in source.named_parameters() if ".gate" not in n}
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name in src and p.shape == src[name].shape:
                p.copy_(src[name] + 0.05 * torch.randn_like(p))  # non-zero updates (B starts at 0)
                src[name].copy_(p)


# -- gates: σ(0) = 1/2 -----------------------------------------------------------------------
def _pair(case, part: str, **extra):
    """The same part gated (gates zeroed) and ungated, with equal parameters."""
    cfg = {**SMALL, "submodules": [part] if part != "prompt" else [], **extra}
    if part == "prompt":
        cfg.update(prompt=True, prompt_gated=True)
    gated = petlkit.attach(case.make(), "unipelt", **cfg, gated=True, lora_alpha=2.0)
    plain_cfg = {**cfg, "prompt_gated": False} if part == "prompt" else cfg
    plain = petlkit.attach(case.make(), "unipelt", **plain_cfg, gated=False, lora_alpha=2.0)
    assert _zero_gates(gated) > 0
    _copy_part_parameters(plain, gated)
    return gated, plain


def _first(model, kind):
    return next(m for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("part,kind", [("lora", LoRALinear), ("adapter", AdapterTuner)])
def test_zero_gate_halves_a_weight_space_part(bert_case, part, kind):
    gated, plain = _pair(bert_case, part)  # lora_alpha = r: the ungated scale α/r is 1
    tuner_g, tuner_p = _first(gated, kind), _first(plain, kind)
    x = torch.randn(2, 5, tuner_p.base_layer.in_features)
    base = tuner_p.base_layer(x)
    plain_part = tuner_p(x) - base
    assert plain_part.abs().max() > 1e-3
    torch.testing.assert_close(tuner_g(x) - base, 0.5 * plain_part, rtol=0, atol=1e-6)


def test_zero_gate_halves_the_prefix(bert_case):
    gated, plain = _pair(bert_case, "prefix")
    x = torch.randn(2, 5, 32)
    prefix_g = gated.methods["default"].parts["prefix"]
    prefix_p = plain.methods["default"].parts["prefix"]
    for index in range(2):
        (kg, vg), (kp, vp) = prefix_g._block_kv(index, x), prefix_p._block_kv(index, x)
        torch.testing.assert_close(kg, 0.5 * kp, rtol=0, atol=0)
        torch.testing.assert_close(vg, 0.5 * vp, rtol=0, atol=0)


def test_zero_gate_halves_the_prompt(bert_case):
    gated, plain = _pair(bert_case, "prompt")
    x = torch.randn(2, 5, 32)
    tokens_g = gated.methods["default"].parts["prompt"]._tokens(x)
    tokens_p = plain.methods["default"].parts["prompt"]._tokens(x)
    torch.testing.assert_close(tokens_g, 0.5 * tokens_p, rtol=0, atol=0)


def test_gate_is_one_scalar_per_example(bert_case):
    model = petlkit.attach(bert_case.make(), "unipelt", **SMALL)
    gates = [m for m in model.modules() if type(m).__name__ == "Gate"]
    assert len(gates) == 3 * 2  # LoRA, prefix and adapter gates in each of the 2 blocks
    out = gates[0](torch.randn(4, 7, 32))
    assert out.shape == (4,) and ((out > 0) & (out < 1)).all()


# -- variants and parts ----------------------------------------------------------------------
VARIANTS = {
    "lora-gated": {"submodules": ["lora"]},
    "prefix-gated": {"submodules": ["prefix"]},
    "adapter-gated": {"submodules": ["adapter"]},
    "prompt-gated": {"submodules": [], "prompt": True, "prompt_gated": True},
    "lora-plain": {"submodules": ["lora"], "gated": False},
    "AP": {"submodules": ["adapter", "prefix"]},
    "APL": {},
    "APL+prompt": {"prompt": True},
    "APL-ungated+prompt": {"prompt": True, "gated": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_only_its_parameters_and_round_trips(bert_case, variant, tmp_path):
    model = petlkit.attach(bert_case.make(), "unipelt", **SMALL, **VARIANTS[variant])
    before = snapshot(model)
    logits = model(**bert_case.inputs)
    F.cross_entropy(logits, bert_case.labels).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    train_steps(model, bert_case.inputs, bert_case.labels)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    method = model.methods["default"]
    expected_parts = set(method.config.part_configs())
    assert set(method.parts) == expected_parts
    own = {id(p) for p in method.trainable(model.model).values()}
    head = {id(p) for p in model.model.head.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == own | head
    gates = sum(type(m).__name__ == "Gate" for m in model.modules())
    gated_parts = expected_parts - {"prompt"} if method.config.gated else set()
    assert gates == 2 * len(gated_parts) + (method.config.prompt and method.config.prompt_gated)
    petlkit.save_adapter(model, tmp_path)
    loaded = petlkit.load_adapter(bert_case.make(), tmp_path)
    torch.testing.assert_close(
        loaded(**bert_case.inputs), model(**bert_case.inputs), rtol=0, atol=0
    )


def test_gated_lora_refuses_to_merge_with_the_reason(bert_case):
    model = petlkit.attach(bert_case.make(), "lora", r=2, gated=True)
    with pytest.raises(petlkit.NotMergeableError, match="gated LoRA cannot merge.*gated=False"):
        model.merge()
    ungated = petlkit.attach(bert_case.make(), "unipelt", submodules=["lora"], gated=False)
    ungated.merge()  # an ungated LoRA-only UniPELT is plain LoRA, and merges


def test_a_part_switched_off_is_absent(bert_case):
    model = petlkit.attach(bert_case.make(), "unipelt", **SMALL, submodules=["adapter", "lora"])
    names = [n for n, _ in model.named_parameters()]
    assert not any("prefix" in n for n in names)
    assert model.model.encoder.config._attn_implementation == "sdpa"  # no prefix: untouched


def test_bad_unipelt_configs_are_refused():
    with pytest.raises(petlkit.ConfigError, match="submodules must be one of"):
        petlkit.make_config("unipelt", submodules=["lora", "bias"])
    with pytest.raises(petlkit.ConfigError, match="nothing to train"):
        petlkit.make_config("unipelt", submodules=[])
    with pytest.raises(petlkit.ConfigError, match="prefix_length must be a positive integer"):
        petlkit.make_config("unipelt", prefix_length=0)


# -- the prefix's reparameterisation ----------------------------------------------------------
def test_prefix_mlp_is_dropped_for_export_without_changing_outputs(bert_case, tmp_path):
    model = petlkit.attach(bert_case.make(), "unipelt", **SMALL)
    train_steps(model, bert_case.inputs, bert_case.labels)
    expected = model(**bert_case.inputs)
    petlkit.save_adapter(model, tmp_path)
    stored = petlkit.io.read_safetensors(tmp_path / "adapter_model.safetensors")
    assert not any(".mlp." in k or "embedding" in k for k in stored)
    assert stored["method.parts.prefix.prefix"].shape == (3, 2 * 2 * 32)  # p × L·2·d
    loaded = petlkit.load_adapter(bert_case.make(), tmp_path)
    assert loaded.methods["default"].config.prefix_reparameterize is False
    torch.testing.assert_close(loaded(**bert_case.inputs), expected, rtol=0, atol=1e-6)
    model.methods["default"].drop_reparameterization()
    torch.testing.assert_close(model(**bert_case.inputs), expected, rtol=0, atol=1e-6)


def test_full_save_keeps_the_mlp_to_continue_training(bert_case, tmp_path):
    model = petlkit.attach(bert_case.make(), "prefix", length=3, hidden=16)
    petlkit.save_adapter(model, tmp_path, compact=False)
    loaded = petlkit.load_adapter(bert_case.make(), tmp_path)
    assert loaded.methods["default"].config.reparameterize
    torch.testing.assert_close(loaded(**bert_case.inputs), model(**bert_case.inputs))


def test_prefix_on_an_encoder_without_the_attention_interface_is_refused():
    from transformers import MPNetConfig, MPNetModel

    from petlkit.backbones import TextClassifier

    config = MPNetConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)  # fmt: skip
    model = TextClassifier(MPNetModel(config, add_pooling_layer=False), 2)
    with pytest.raises(petlkit.PetlError, match="AttentionInterface.*LoRA, adapters or prompt"):
        petlkit.attach(model, "prefix")


def test_two_prefix_methods_on_one_block_are_refused(bert_case):
    model = petlkit.attach(bert_case.make(), "prefix", length=2)
    layout = model.model.petl_layout()
    with pytest.raises(petlkit.PetlError, match="already gets extra key/value tokens"):
        add_extra_kv(model.model, layout, 0, lambda x: None)


def test_removing_prefix_restores_the_attention_implementation(bert_case):
    model = petlkit.attach(bert_case.make(), "prefix", length=2)
    assert model.model.encoder.config._attn_implementation == "petlkit_sdpa"
    model.remove_method("default")
    assert model.model.encoder.config._attn_implementation == "sdpa"


# -- parameter counts: the formulas in docs/methods/unipelt.md ---------------------------------
def formulas(d: int, layers: int, r=8, p=10, hidden=512, reduction=16, n=10) -> dict[str, int]:
    gates = layers * (d + 1)
    m = d // reduction
    return {
        "lora": 4 * r * d * layers,
        "prefix_stored": 2 * p * d * layers,
        "prefix_training": p * d
        + (d * hidden + hidden)
        + (hidden * 2 * d * layers + 2 * d * layers),
        "adapter": layers * (2 * d * m + m + d),
        "prompt": n * d,
        "gates": gates,
    }


@pytest.fixture(scope="module")
def minilm():
    return minilm_case()


def _count(case, method, **kwargs) -> int:
    return petlkit.attach(case.make(), method, **kwargs).trainable_parameters().trainable


def test_counts_match_the_documented_formulas_on_minilm(minilm):
    f = formulas(d=384, layers=6)
    assert f["lora"] == 73_728 and f["adapter"] == 113_040  # the numbers the doc prints
    assert _count(minilm, "lora") == f["lora"]
    assert _count(minilm, "lora", gated=True) == f["lora"] + f["gates"]
    assert _count(minilm, "adapter") == f["adapter"]
    assert _count(minilm, "prefix") == f["prefix_training"]
    assert _count(minilm, "prefix", reparameterize=False) == f["prefix_stored"]
    assert _count(minilm, "prompt") == f["prompt"]
    assert _count(minilm, "prompt", gated=True) == f["prompt"] + 385
    apl = f["lora"] + f["prefix_training"] + f["adapter"] + 3 * f["gates"]
    assert _count(minilm, "unipelt") == apl
    assert _count(minilm, "unipelt-ap") == apl - f["lora"] - f["gates"]
    assert _count(minilm, "unipelt-prompt") == apl + f["prompt"]
    stored = f["lora"] + f["prefix_stored"] + f["adapter"] + 3 * f["gates"]
    assert _count(minilm, "unipelt", prefix_reparameterize=False) == stored
