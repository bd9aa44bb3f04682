"""UniPELT, its gates and its parts: the arithmetic, the variants, the counts in the docs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.backbones.extensions import add_extra_kv
from petlkit.methods.base import innermost
from tests.conftest import minilm_case
from tests.helpers import snapshot, train_steps

SMALL = {"prefix_length": 3, "prefix_hidden": 16, "lora_r": 2, "adapter_reduction": 4}


def _randomise(petl, scale: float = 0.3) -> None:
    """Every trained tensor non-zero and away from its init, so no term can hide."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn_like(p))


def _gate(gate, h: torch.Tensor) -> torch.Tensor:
    """The original formula: mean over tokens of σ(W_G·h_t + b_G), (batch, outputs)."""
    return torch.sigmoid(h @ gate.linear.weight.T + gate.linear.bias).mean(dim=1)


def test_every_gate_starts_near_one_half(bert_case):
    """UniPELT's init, W_G ~ N(0, 0.02) and b_G = 0: each gate starts near σ(0) = 0.5 on the
    backbone's own activations, so no part starts switched off or at full strength."""
    petl = petlkit.attach(bert_case.make(), "unipelt", prompt=True, prompt_gated=True,
                          **SMALL).eval()  # fmt: skip
    seen, inputs = [], []  # gate values; (gate, input) of gates that run inside fused nodes

    def record(gate, module, args, out):
        inputs.append((gate, args[0] if out is None else out))

    for module in petl.modules():
        kind = type(module).__name__
        if kind == "Gate":
            assert module.linear.weight.std() < 0.03 and not module.linear.bias.any()
            module.register_forward_hook(lambda m, args, out: seen.append(out))
        if kind == "LoRALinear":  # its gate runs in its block's grouped node (gate.py)
            module.register_forward_pre_hook(partial(record, module.gate, out=None))
        if kind == "PostNormAdapterTuner":  # its gate runs in the fused adapter node
            module.base_layer.register_forward_hook(partial(record, module.adapter.gate))
    petl(**bert_case.inputs)
    assert len(seen) == 1 + 2  # the prompt; per layer the prefix
    # per layer: LoRA on q and on v; the adapter's norm runs twice, the first feeds the gate
    assert len(inputs) == 2 * 4
    seen += [_gate(gate, x) for i, (gate, x) in enumerate(inputs) if i % 4 != 3]
    values = torch.cat([g.flatten() for g in seen])
    assert (values - 0.5).abs().max() < 0.05


# -- each gate: its input, its value, where it applies -----------------------------------------
def test_gated_lora_has_one_gate_per_projection_fed_by_that_projection_input(bert_case):
    petl = petlkit.attach(bert_case.make(), "lora", r=2, gated=True).eval()
    _randomise(petl)
    attention = petl.model.encoder.encoder.layer[0].attention.self
    query, value = attention.query, attention.value
    assert query.gate is not value.gate  # UniPELT: LoRA_Linear(add_gate=True) per projection
    h = torch.randn(3, 5, 32)
    for tuner in (query, value):
        base = tuner.base_layer
        low = h @ tuner.lora_A.T @ tuner.lora_B[0].T
        expected = base(h) + low * _gate(tuner.gate, h).unsqueeze(1)
        torch.testing.assert_close(tuner(h), expected, rtol=0, atol=1e-6)


def test_gated_lora_on_a_fused_qkv_gates_q_and_v_apart_and_leaves_k(vit_case):
    petl = petlkit.attach(vit_case.make(), "lora", r=2, gated=True).eval()
    _randomise(petl)
    qkv = petl.model.blocks[0].attn.qkv
    h = torch.randn(2, 6, 32)
    g = _gate(qkv.gate, h)  # (batch, 2): the q gate and the v gate
    assert g.shape == (2, 2) and not torch.allclose(g[:, 0], g[:, 1])
    a = qkv.lora_A.unflatten(0, (2, 2))
    dq = h @ a[0].T @ qkv.lora_B[0].T * g[:, 0, None, None]
    dv = h @ a[1].T @ qkv.lora_B[1].T * g[:, 1, None, None]
    expected = qkv.base_layer(h) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
    torch.testing.assert_close(qkv(h), expected, rtol=0, atol=1e-6)


def test_gated_prefix_scales_both_keys_and_values_by_the_attention_input_gate(bert_case):
    petl = petlkit.attach(bert_case.make(), "prefix", length=3, hidden=16, gated=True).eval()
    _randomise(petl)
    prefix = petl.methods["default"]
    h = torch.randn(2, 5, 32)
    prefix._kv = None
    key, value = prefix._block_kv(1, h)
    raw_key, raw_value = prefix.key_values()[1]
    g = _gate(prefix.gates[1], h).view(2, 1, 1, 1)
    torch.testing.assert_close(key, raw_key * g, rtol=0, atol=1e-6)
    torch.testing.assert_close(value, raw_value * g, rtol=0, atol=1e-6)


def test_gated_adapter_on_bert_reads_the_normed_ffn_output_plus_residual(bert_case):
    """AdapterHub/UniPELT Pfeiffer: y = h_ffn + residual, x = LN(y); out = LN(y + G(x)·A(x))."""
    petl = petlkit.attach(bert_case.make(), "adapter", reduction_factor=4, gated=True).eval()
    _randomise(petl)
    output = petl.model.encoder.encoder.layer[0].output
    h_inter, residual = torch.randn(2, 5, 37), torch.randn(2, 5, 32)
    norm = output.LayerNorm.base_layer
    adapter = output.LayerNorm.adapter
    y = output.dense(h_inter) + residual
    x = norm(y)
    update = adapter.up(torch.relu(adapter.down(x))) * _gate(adapter.gate, x).unsqueeze(-1)
    torch.testing.assert_close(output(h_inter, residual), norm(y + update), rtol=0, atol=1e-6)


def test_gated_adapter_on_a_pre_norm_vit_reads_the_block_output(vit_case):
    petl = petlkit.attach(vit_case.make(), "adapter", reduction_factor=4, gated=True).eval()
    _randomise(petl)
    block, adapter = petl.model.blocks[1], petl.methods["default"].block_adapters[1]
    h = torch.randn(2, 17, 32)
    with petl.disable():
        y = block(h)
    update = adapter.up(torch.relu(adapter.down(y))) * _gate(adapter.gate, y).unsqueeze(-1)
    torch.testing.assert_close(block(h), y + update, rtol=0, atol=1e-6)


def test_gated_prompt_scales_the_tokens_by_the_embedded_input_gate(bert_case):
    petl = petlkit.attach(bert_case.make(), "prompt", length=3, gated=True).eval()
    _randomise(petl)
    method = petl.methods["default"]
    e = torch.randn(2, 5, 32)
    expected = method.prompt * _gate(method.gate, e).view(2, 1, 1)
    torch.testing.assert_close(method._tokens(e), expected, rtol=0, atol=1e-6)


def test_one_bert_layer_equals_the_original_unipelt_equations(bert_case):
    """UniPELT (APL) on one BERT layer, computed by hand from the original code's equations:
    per-projection gated LoRA on q and v, gated prefix keys/values, Pfeiffer gated adapter."""
    petl = petlkit.attach(bert_case.make(), "unipelt", **SMALL).eval()
    _randomise(petl)
    layer = petl.model.encoder.encoder.layer[0]
    parts = petl.methods["default"].parts
    h = torch.randn(2, 5, 32)
    att = layer.attention.self

    def lora(tuner, x):
        low = x @ tuner.lora_A.T @ tuner.lora_B[0].T
        return innermost(tuner)(x) + low * _gate(tuner.gate, x).unsqueeze(1)

    heads, hd = 4, 8

    def split(t):
        return t.view(2, -1, heads, hd).transpose(1, 2)

    q, k, v = split(lora(att.query, h)), split(att.key(h)), split(lora(att.value, h))
    prefix = parts["prefix"]
    pk, pv = prefix.key_values()[0]
    gp = _gate(prefix.gates[0], h).view(2, 1, 1, 1)
    k = torch.cat([pk.expand(2, -1, -1, -1) * gp, k], dim=2)
    v = torch.cat([pv.expand(2, -1, -1, -1) * gp, v], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(2, 5, 32)
    a = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
    h_ffn = layer.output.dense(layer.intermediate(a))
    norm, adapter = layer.output.LayerNorm.base_layer, layer.output.LayerNorm.adapter
    y = h_ffn + a
    x = norm(y)
    out = norm(y + adapter.up(torch.relu(adapter.down(x))) * _gate(adapter.gate, x).unsqueeze(-1))
    prefix._kv = None
    got = layer(h)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, out, rtol=0, atol=1e-5)


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
    per_block = sum(2 if part == "lora" else 1 for part in gated_parts)  # LoRA: q and v
    assert gates == 2 * per_block + (method.config.prompt and method.config.prompt_gated)
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
    with pytest.raises(petlkit.PetlError, match="AttentionInterface.*adapters, SaS or prompt"):
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
    gates = layers * (d + 1)  # one gate per block (LoRA has two: q and v)
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
    assert _count(minilm, "lora", gated=True) == f["lora"] + 2 * f["gates"]
    assert _count(minilm, "adapter") == f["adapter"]
    assert _count(minilm, "prefix") == f["prefix_training"]
    assert _count(minilm, "prefix", reparameterize=False) == f["prefix_stored"]
    assert _count(minilm, "prompt") == f["prompt"]
    assert _count(minilm, "prompt", gated=True) == f["prompt"] + 385
    apl = f["lora"] + f["prefix_training"] + f["adapter"] + 4 * f["gates"]
    assert _count(minilm, "unipelt") == apl
    assert _count(minilm, "unipelt-ap") == apl - f["lora"] - 2 * f["gates"]
    assert _count(minilm, "unipelt-prompt") == apl + f["prompt"]
    stored = f["lora"] + f["prefix_stored"] + f["adapter"] + 4 * f["gates"]
    assert _count(minilm, "unipelt", prefix_reparameterize=False) == stored
