"""Decoders generate with every method that applies: the KV cache on and off give the same tokens
(prefix and prompt tokens are not stored in the cache again at each step), a method that starts at
identity generates the base model's tokens, and a merged model generates what the unmerged one does.
"""

from __future__ import annotations

import pytest
import torch

import petlkit
from tests.families import BY_NAME
from tests.test_methods_generic import CONFIGS

DECODERS = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt-neox", "opt")
METHODS = ("lora", "sas", "adapter", "ssf", "full", "prefix", "prompt", "unipelt", "unipelt-prompt")
IDENTITY_AT_INIT = ("lora", "sas", "adapter", "full")
MERGEABLE = ("lora", "sas", "ssf")


def prompt_batch() -> dict[str, torch.Tensor]:
    """Two prompts, the second left-padded (as generation batches are)."""
    ids = torch.tensor([[5, 17, 33, 41, 8, 9], [0, 0, 12, 60, 7, 23]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def greedy(model, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**prompt_batch(), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, use_cache=use_cache, pad_token_id=0)  # fmt: skip


def perturbed(petl) -> petlkit.PetlModel:
    """Every trained tensor moved off its initial value, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return petl


def attach(family: str, method: str) -> petlkit.PetlModel:
    return petlkit.attach(BY_NAME[family].make(), method, **CONFIGS[method])


CELLS = [(f, m) for f in DECODERS for m in METHODS]


@pytest.mark.parametrize(("family", "method"), CELLS, ids=["-".join(c) for c in CELLS])
def test_the_kv_cache_changes_no_token(family, method):
    petl = perturbed(attach(family, method))
    cached, uncached = greedy(petl, use_cache=True), greedy(petl, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # the method is live (a random tiny model may still pick the same)
        adapted = petl(**prompt_batch()).logits
        with petl.disable():
            assert not torch.allclose(petl(**prompt_batch()).logits, adapted)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_an_identity_start_generates_the_base_tokens(family, method):
    base = greedy(BY_NAME[family].make())
    assert torch.equal(greedy(attach(family, method)), base)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", MERGEABLE)
def test_a_merged_model_generates_what_the_unmerged_one_does(family, method):
    petl = perturbed(attach(family, method))
    unmerged = greedy(petl)
    petl.merge()
    assert torch.equal(greedy(petl), unmerged)


def test_prompt_tokens_enter_the_cache_once():
    """After the first forward the cache holds p prompt tokens + the text; each later step adds
    exactly one position."""
    petl = perturbed(attach("llama", "prompt"))
    batch = prompt_batch()
    out = petl(**batch, use_cache=True)
    cache = out.cache
    length = CONFIGS["prompt"]["length"]
    assert cache.get_seq_length() == length + batch["input_ids"].shape[1]
    assert out.logits.shape[1] == batch["input_ids"].shape[1]  # prompts are not in the logits
    step = petl(
        input_ids=torch.tensor([[3], [4]]),
        cache=cache,
        use_cache=True,
        attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 1).long()], 1),
    )
    assert step.cache.get_seq_length() == length + batch["input_ids"].shape[1] + 1


def test_the_readme_example_on_a_transformers_decoder_runs():
    from tests.docs_snippets import python_blocks

    block = next(b for b in python_blocks("README.md") if "LlamaForCausalLM(config)" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["tokens"].shape == (2, 12)
    assert namespace["model"].model.model.layers[0].self_attn.q_proj.lora_A.requires_grad


@pytest.mark.parametrize("method", ["prefix", "unipelt", "lora", "sas"])
def test_a_static_cache_generates_the_same_tokens(method):
    """A static cache holds empty slots past the tokens so far: the prefix must be visible to
    every query, the empty slots to none."""
    petl = perturbed(attach("llama", method))
    with torch.no_grad():
        static = petl.generate(**prompt_batch(), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, pad_token_id=0,
                               cache_implementation="static")  # fmt: skip
    assert torch.equal(static, greedy(petl, use_cache=False))


def test_prompts_refuse_a_static_cache():
    petl = perturbed(attach("llama", "prompt"))
    with pytest.raises(petlkit.PetlError, match="static KV cache"):
        petl.generate(**prompt_batch(), max_new_tokens=2, do_sample=False, pad_token_id=0,
                      cache_implementation="static")  # fmt: skip


SEQ2SEQ = [(f, m) for f in ("t5", "bart") for m in ("prefix", "prompt", "unipelt", "lora", "sas")]


@pytest.mark.parametrize(("family", "method"), SEQ2SEQ, ids=["-".join(c) for c in SEQ2SEQ])
def test_encoder_decoders_generate_the_same_with_and_without_the_cache(family, method):
    """The prefix is in both stacks' self-attention (the decoder's cached), prompts in front of
    the encoder's input."""
    petl = perturbed(attach(family, method))
    with torch.no_grad():
        runs = [petl.generate(**prompt_batch(), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, use_cache=cache, pad_token_id=0,
                              decoder_start_token_id=0) for cache in (True, False)]  # fmt: skip
    assert torch.equal(*runs)
