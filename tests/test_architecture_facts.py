"""The architecture facts each family brings, each handled and shown here: grouped-query attention,
rotary positions, causal masks, bias-free linears, RMSNorm, fused projections, tied embeddings,
shared layers, and what a task head is on a transformers model."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.backbones import extensions
from petlkit.layout import head_names, layout_of
from petlkit.methods.ssf import SSFTuner
from tests.families import BY_NAME


def make(name: str, **overrides) -> torch.nn.Module:
    model = BY_NAME[name].make()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return model


def batch(name: str) -> dict[str, torch.Tensor]:
    return BY_NAME[name].inputs()


def randomise(petl) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))


# -- grouped-query attention and rotary positions ---------------------------------------------
def test_prefix_keys_and_values_come_per_key_value_head():
    petl = petlkit.attach(make("llama"), "prefix", length=3, hidden=16)
    layout = layout_of(petl.model)
    assert (layout.num_heads, layout.key_value_heads, layout.dim_per_head) == (4, 2, 8)
    # (blocks, keys and values, kv heads, length, head_dim): 2 kv heads, not the 4 query heads
    assert petl.methods["default"].key_values().shape == (2, 2, 2, 3, 8)


def test_prefix_keys_reach_attention_unrotated(monkeypatch):
    """The keys given to the attention function start with the prefix keys exactly as learned:
    the model's rotary embedding (applied to its own keys before) never touches them."""
    seen = []
    inner = extensions._inner_attention

    def spy(module, name):
        fn = inner(module, name)

        def record(module, query, key, value, mask, **kwargs):
            seen.append(key.detach().clone())
            return fn(module, query, key, value, mask, **kwargs)

        return record

    monkeypatch.setattr(extensions, "_inner_attention", spy)
    petl = petlkit.attach(make("llama"), "prefix", length=3, reparameterize=False)
    randomise(petl)
    with torch.no_grad():
        petl(**batch("llama"))
        learned = petl.methods["default"].key_values()
    for block, key in enumerate(seen):
        torch.testing.assert_close(key[:, :, :3], learned[block, 0].expand(3, -1, -1, -1))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bert", "vit", "t5", "bart"])
@pytest.mark.parametrize("method", ["prefix", "unipelt"])
def test_prefix_gives_the_same_output_through_sdpa_and_eager(family, method):
    """sdpa builds its causal mask itself when none is given; petlkit then builds one in which
    every query sees the prefix. Both attention paths must agree, padding included."""
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = make(family)
        model.set_attn_implementation(implementation)
        torch.manual_seed(3)
        petl = petlkit.attach(model, method, prefix_length=3, prefix_hidden=16, lora_r=2,
                              adapter_reduction=4) if method == "unipelt" else petlkit.attach(
            model, method, length=3, hidden=16)  # fmt: skip
        randomise(petl)
        with torch.no_grad():
            out = petl(**batch(family))
        outputs.append(out.logits if hasattr(out, "logits") else out.last_hidden_state)
    mask = batch(family).get("attention_mask")
    if mask is not None and outputs[0].shape[:2] == mask.shape:  # padding is not compared
        outputs = [o[mask.bool()] for o in outputs]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


# -- causal masks ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt", "unipelt", "unipelt-prompt", "lora"])
def test_causal_models_stay_causal(method):
    """A later token never changes an earlier position's output, with any method; the prefix
    and the prompt tokens are seen from the first position on."""
    from tests.test_methods_generic import CONFIGS

    petl = petlkit.attach(make("llama"), method, **CONFIGS[method])
    randomise(petl)
    ids = torch.tensor([[5, 17, 33, 41, 8, 9]])
    changed = ids.clone()
    changed[0, -1] = 60
    with torch.no_grad():
        a, b = petl(input_ids=ids).logits, petl(input_ids=changed).logits
        torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, -1], b[:, -1])
        if method != "lora":
            with petl.disable():
                assert not torch.allclose(petl(input_ids=ids).logits[:, 0], a[:, 0])


def test_unipelts_gates_are_per_position_on_causal_models():
    """On an encoder a gate is one scalar per example (the mean over its tokens); on a decoder
    one per position, so no position reads the tokens after it."""
    encoder = petlkit.attach(make("bert"), "unipelt", prefix_length=2, prefix_hidden=8)
    decoder = petlkit.attach(make("llama"), "unipelt", prefix_length=2, prefix_hidden=8)
    x = torch.randn(2, 5, 32)
    lora = next(t for _, t in decoder.methods["default"].parts["lora"].tuners(decoder.model))
    assert lora.gate(x).shape == (2, 5, 1)  # one gate per position
    lora = next(t for _, t in encoder.methods["default"].parts["lora"].tuners(encoder.model))
    assert lora.gate(x).shape == (2, 1)


def test_a_gated_prompt_is_refused_on_a_causal_model():
    with pytest.raises(petlkit.PetlError, match="causal model.*gated=False"):
        petlkit.attach(make("llama"), "prompt", length=2, gated=True)


# -- bias-free linears and RMSNorm -------------------------------------------------------------
def test_bitfit_on_bias_free_linears_adds_offsets_that_merge_into_new_biases():
    petl = petlkit.attach(make("llama"), "bitfit", add_missing=True)
    randomise(petl)
    with torch.no_grad():
        expected = petl(**batch("llama")).logits
        petl.merge()
        q_proj = petl.model.model.layers[0].self_attn.q_proj
        assert q_proj.bias is not None
        torch.testing.assert_close(petl(**batch("llama")).logits, expected, rtol=0, atol=1e-5)
        petl.unmerge()
        assert q_proj.bias is None


@pytest.mark.parametrize(("family", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_ssf_scales_rms_norms_and_merges_with_their_offset(family, offset):
    petl = petlkit.attach(make(family), "ssf")
    norms = [t for _, t in petl.methods["default"].tuners(petl.model)
             if type(t.base_layer).__name__.endswith("RMSNorm")]  # fmt: skip
    assert norms and all(isinstance(t, SSFTuner) and not hasattr(t, "ssf_shift") for t in norms)
    assert layout_of(petl.model).norm_offset == offset
    randomise(petl)
    with torch.no_grad():
        expected = petl(**batch(family)).logits
        petl.merge()
        torch.testing.assert_close(petl(**batch(family)).logits, expected, rtol=0, atol=1e-5)


# -- fused projections -------------------------------------------------------------------------
def _k_rows(family: str) -> torch.Tensor:
    """Which output rows of the fused projection are the keys."""
    if family == "gpt-neox":  # per head: q, k, v of head_dim rows each
        return torch.cat([torch.arange(h * 24 + 8, h * 24 + 16) for h in range(4)])
    if family == "phi3":  # q: 4 heads × 8, k: 2 kv heads × 8, v: 2 × 8
        return torch.arange(32, 48)
    return torch.arange(32, 64)  # gpt2: q | k | v, 32 each


FUSED = {"gpt2": "attn.c_attn", "phi3": "self_attn.qkv_proj",
         "gpt-neox": "attention.query_key_value"}  # fmt: skip


@pytest.mark.parametrize(("family", "fused"), sorted(FUSED.items()))
def test_lora_on_a_fused_projection_adapts_exactly_q_and_v(family, fused):
    model = make(family)
    block = model.get_submodule(layout_of(model).blocks[0].block)
    layer = block.get_submodule(fused)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        before = layer(x)
    petl = petlkit.attach(model, "lora", r=2)
    randomise(petl)
    with torch.no_grad():
        delta = block.get_submodule(fused)(x) - before
    keys = torch.zeros(delta.shape[-1], dtype=torch.bool)
    keys[_k_rows(family)] = True
    assert torch.count_nonzero(delta[..., keys]) == 0  # k untouched
    assert (delta[..., ~keys].abs() > 0).float().mean() > 0.99  # q and v all adapted


# -- heads and tied embeddings -----------------------------------------------------------------
@pytest.mark.parametrize(("family", "heads", "frozen"), [
    ("bert", ("classifier",), ()), ("roberta", ("classifier",), ()),
    ("distilbert", ("pre_classifier", "classifier"), ()), ("vit", ("classifier",), ()),
    ("llama", (), ("lm_head",)), ("gpt2", (), ("lm_head",)), ("t5", (), ("lm_head",)),
    ("clip-vision", (), ()),
])  # fmt: skip
def test_the_task_head_trains_and_a_language_model_head_stays_frozen(family, heads, frozen):
    petl = petlkit.attach(make(family), "lora", r=2)
    assert head_names(petl.model) == heads
    assert layout_of(petl.model).frozen_heads == frozen
    for name in frozen:
        assert not any(p.requires_grad for p in petl.model.get_submodule(name).parameters())
    for name in heads:
        assert all(p.requires_grad for p in petl.model.get_submodule(name).parameters())


def test_tied_embeddings_train_only_when_asked():
    frozen = petlkit.attach(make("gpt2"), "lora", r=2)
    wte = frozen.model.transformer.wte.weight
    assert wte is frozen.model.lm_head.weight and not wte.requires_grad
    asked = petlkit.attach(make("gpt2"), "lora", r=2, heads=["lm_head"])
    assert asked.model.lm_head.weight.requires_grad  # and with it the tied input embeddings
    assert asked.trainable_parameters().head == 99 * 32


def test_outputs_keep_the_models_own_loss():
    """A training loop reading `outputs.loss` keeps working, prompts included."""
    for family, method in (("bert", "lora"), ("llama", "prompt"), ("llama", "unipelt-prompt")):
        from tests.test_methods_generic import CONFIGS

        petl = petlkit.attach(make(family), method, **CONFIGS[method])
        inputs = batch(family)
        labels = torch.tensor([0, 1, 0]) if family == "bert" else inputs["input_ids"]
        out = petl(**inputs, labels=labels)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.logits.shape[:2] == (3, 2 if family == "bert" else 10)


@pytest.mark.filterwarnings("ignore:.*ALBERT runs one set")  # asserted below
def test_sas_on_albert_transforms_the_input_of_each_projection():
    """ALBERT's attention module adds the residual itself, so no module reads only what q, k and
    v read: SaS transforms each projection's input, and merges into all three."""
    petl = petlkit.attach(make("albert"), "sas")
    randomise(petl)
    with torch.no_grad():
        expected = petl(**batch("albert")).logits
        petl.merge()
        torch.testing.assert_close(petl(**batch("albert")).logits, expected, rtol=0, atol=1e-5)


def test_the_causal_mask_built_for_a_prefix_is_sdpas_own():
    """Where transformers leaves the causal mask to sdpa (no mask given), the mask petlkit builds
    to extend with prefix keys gives what sdpa's is_causal gives, for as many keys as queries and
    more (a static cache's empty slots after them)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for queries, keys in ((4, 4), (3, 6)):
        q, k, v = (
            torch.randn(1, 2, queries, 8),
            torch.randn(1, 2, keys, 8),
            torch.randn(1, 2, keys, 8),
        )
        mask = extensions._causal_mask(queries, keys, q.device)
        ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_albert_shares_one_block_and_says_so():
    layout = layout_of(make("albert"))
    assert layout.depth == 1 and "one set of parameters" in layout.shared_layers
    with pytest.warns(UserWarning, match="sas on AlbertForSequenceClassification: ALBERT runs one"):
        petlkit.attach(make("albert"), "sas")


# -- the KV cache, chunk by chunk ------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt", "unipelt", "unipelt-prompt", "sas"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_forward_in_two_chunks_through_the_cache_equals_one_forward(family, method):
    """Prefill 4 tokens, then 3 more at once through the cache (q > 1 with a filled cache):
    the last 3 positions' logits equal one forward over all 7."""
    from tests.test_methods_generic import CONFIGS

    petl = petlkit.attach(make(family), method, **CONFIGS[method])
    randomise(petl)
    ids = torch.tensor([[5, 17, 33, 41, 8, 9, 60]])
    with torch.no_grad():
        whole = petl(input_ids=ids).logits
        first = petl(input_ids=ids[:, :4], use_cache=True)
        rest = petl(input_ids=ids[:, 4:], cache=first.cache, use_cache=True,
                    attention_mask=torch.ones(1, 7, dtype=torch.long))  # fmt: skip
    torch.testing.assert_close(rest.logits, whole[:, 4:], rtol=1e-4, atol=1e-5)


# -- the gated prefix on a causal model --------------------------------------------------------
@pytest.mark.parametrize(("bias", "expected"), [(-60.0, "no prefix"), (60.0, "whole prefix")])
def test_a_closed_gate_removes_the_prefix_and_an_open_one_keeps_it_whole(bias, expected):
    """On a decoder the gate multiplies each query's attention weights on the prefix: G = 0
    is the model without prefix, G = 1 the ungated prefix with the same values."""
    gated = petlkit.attach(make("llama"), "prefix", length=3, reparameterize=False, gated=True)
    plain = petlkit.attach(make("llama"), "prefix", length=3, reparameterize=False)
    randomise(plain)
    with torch.no_grad():
        gated.methods["default"].prefix.copy_(plain.methods["default"].prefix)
        for gate in gated.methods["default"].gates:
            gate.linear.weight.zero_()
            gate.linear.bias.fill_(bias)
        inputs = batch("llama")
        ours = gated(**inputs).logits
        if expected == "whole prefix":
            reference = plain(**inputs).logits
        else:
            with plain.disable():
                reference = plain(**inputs).logits
    real = inputs["attention_mask"].bool()  # a padding query sees no key of its own
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-4, atol=1e-5)


# -- folded training on GPT-2's Conv1D ---------------------------------------------------------
FOLDABLE = [("lora", {"r": 2, "split_fused": False}), ("bitfit", {}), ("ssf", {}), ("sas", {})]


@pytest.mark.parametrize(("method", "kwargs"), FOLDABLE)
def test_folded_training_on_conv1d_layers_computes_the_same(method, kwargs):
    petl = petlkit.attach(make("gpt2"), method, **kwargs)
    randomise(petl)
    inputs = batch("gpt2")
    with torch.no_grad():
        unfolded = petl(**inputs).logits
        petl.set_folded(True)
        torch.testing.assert_close(petl(**inputs).logits, unfolded, rtol=1e-4, atol=1e-4)


# -- encoder-decoders: cross-attention by target names ----------------------------------------
CROSS = {"t5": ["EncDecAttention.q", "EncDecAttention.v"],
         "bart": ["encoder_attn.q_proj", "encoder_attn.v_proj"]}  # fmt: skip


@pytest.mark.parametrize(("family", "targets"), sorted(CROSS.items()))
def test_lora_reaches_cross_attention_by_target_names(family, targets):
    """The layout's default targets are self-attention; cross-attention is a target away."""
    petl = petlkit.attach(make(family), "lora", r=2, targets=targets)
    names = [n for n, _ in petl.methods["default"].tuners(petl.model)]
    assert len(names) == 2 * 2 and all("decoder" in n for n in names)  # 2 decoder blocks × q, v
    randomise(petl)
    with torch.no_grad(), petl.disable():
        base = petl(**batch(family)).logits
    with torch.no_grad():
        assert not torch.allclose(petl(**batch(family)).logits, base)
