"""Parity with HF PEFT on the real MiniLM-L6: given the same values, prefix tuning, prompt tuning
and LoRA give the same encoder outputs as PEFT's PREFIX_TUNING, PROMPT_TUNING and LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

import petlkit
from tests.conftest import minilm_case

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def minilm():
    return minilm_case()


def _peft(case, config):
    encoder = case.make().encoder
    torch.manual_seed(3)
    return get_peft_model(encoder, config).eval()


def _ours(case, method, **kwargs):
    return petlkit.attach(case.make(), method, **kwargs).eval()


def _randomise(params: dict[str, torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _hidden(petl, inputs):
    return petl.model.encoder(**inputs).last_hidden_state


def _mask_padding(hidden, inputs):
    return hidden * inputs["attention_mask"].unsqueeze(-1)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_prefix_tuning_matches_peft(minilm, reparameterize):
    length = 4
    ours = _ours(minilm, "prefix", length=length, hidden=32, reparameterize=reparameterize)
    method = ours.methods["default"]
    _randomise(dict(method.named_parameters()))
    config = PrefixTuningConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=length,
        prefix_projection=reparameterize,
        encoder_hidden_size=32,
    )
    peft = _peft(minilm, config)
    encoder = peft.prompt_encoder["default"]
    with torch.no_grad():
        if reparameterize:
            encoder.embedding.weight.copy_(method.embedding)
            encoder.transform[0].load_state_dict(method.mlp[0].state_dict())
            encoder.transform[2].load_state_dict(method.mlp[2].state_dict())
        else:
            encoder.embedding.weight.copy_(method.prefix)
    inputs = minilm.inputs
    # PEFT hands the prefix to BERT as a key/value cache and so adds the prefix length to every
    # position id; prefix tuning here keeps positions 0..n-1 (the prefix has no position), so
    # PEFT is given arange(n) - length, which its offset turns back into 0..n-1.
    ids = inputs["input_ids"]
    positions = (torch.arange(ids.shape[1]) - length).expand_as(ids)
    with torch.no_grad():
        theirs = peft(**inputs, position_ids=positions).last_hidden_state
        mine = _hidden(ours, inputs)
    diff = (_mask_padding(mine, inputs) - _mask_padding(theirs, inputs)).abs().max()
    assert diff <= TOLERANCE, diff


def test_prompt_tuning_matches_peft(minilm):
    length = 5
    ours = _ours(minilm, "prompt", length=length, placement="before_embeddings")
    peft = _peft(
        minilm,
        PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=length),
    )
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(ours.methods["default"].prompt)
        theirs = peft(**minilm.inputs).last_hidden_state[:, length:]
        mine = _hidden(ours, minilm.inputs)
    assert mine.shape == theirs.shape == (*minilm.inputs["input_ids"].shape, 384)
    diff = (_mask_padding(mine, minilm.inputs) - _mask_padding(theirs, minilm.inputs)).abs().max()
    assert diff <= TOLERANCE, diff


def test_lora_matches_peft(minilm):
    ours = _ours(minilm, "lora", r=4, alpha=8)
    peft = _peft(minilm, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    trained = ours.methods["default"].trainable(ours.model)
    _randomise(trained)
    theirs = dict(peft.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, value in trained.items():
            module, kind = name.removeprefix("encoder.").rsplit(".", 1)
            target = theirs[f"base_model.model.{module}.{kind}.default.weight"]
            target.copy_(value if kind == "lora_A" else value[0])
            copied += 1
    assert copied == 2 * 2 * 6  # A and B, on q and v, in 6 blocks
    with torch.no_grad():
        diff = (_hidden(ours, minilm.inputs) - peft(**minilm.inputs).last_hidden_state).abs()
    assert diff.max() <= TOLERANCE, diff.max()
