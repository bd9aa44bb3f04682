"""Where prompt tuning's soft tokens start: uniform (the spec), sampled word embeddings
(init='vocab'), or the word embeddings of given tokens (init='tokens'; `init_text` on the command
line and in the bench), for prompt tuning and UniPELT's prompt layer."""

from __future__ import annotations

import json

import pytest
import torch

import petlkit
from petlkit.cli import main
from petlkit.methods.prompt import text_init_args
from tests.helpers import LM_ROWS, lm_files, save_tiny_llama, tiny_llama


def _rows_of(table: torch.Tensor, prompt: torch.Tensor) -> list[int]:
    """The index of each prompt row in `table` (-1 where it is no row of it)."""
    equal = (prompt.to(table.dtype)[:, None, :] == table[None]).all(-1)
    return [int(hits.nonzero()[0]) if hits.any() else -1 for hits in equal]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_init_starts_each_prompt_as_a_word_embedding_drawn_by_the_seed(dtype):
    """init='vocab' (Lester et al.'s sampled vocabulary): every soft token starts as a copy of one
    row of the model's own word-embedding table, kept float32 on a bf16 model, and the rows
    drawn follow torch's seed (a run's seed gives the same start)."""

    def prompt_rows(seed):
        model = tiny_llama().to(dtype)
        torch.manual_seed(seed)
        petl = petlkit.attach(model, "prompt", length=6, init="vocab")
        prompt = petl.methods["default"].prompt
        assert prompt.dtype == torch.float32 and prompt.requires_grad
        return _rows_of(model.get_input_embeddings().weight, prompt)

    rows = prompt_rows(0)
    assert -1 not in rows and len(set(rows)) > 1  # real rows, not one row repeated
    assert prompt_rows(0) == rows and prompt_rows(1) != rows
    uniform = petlkit.attach(tiny_llama().to(dtype), "prompt", length=6).methods["default"]
    assert uniform.prompt.abs().max() <= 0.5  # the default is unchanged: uniform(-0.5, 0.5)


def test_unipelt_prompt_layer_takes_the_vocab_init():
    model = tiny_llama()
    petl = petlkit.attach(model, "unipelt", prompt=True, prompt_init="vocab", prompt_length=4)
    prompt = petl.methods["default"].parts["prompt"].prompt
    assert -1 not in _rows_of(model.get_input_embeddings().weight, prompt)
    with pytest.raises(petlkit.ConfigError, match="prompt_init must be one of"):
        petlkit.attach(tiny_llama(), "unipelt", prompt=True, prompt_init="text")
    tokens = (7, 8, 9)
    petl = petlkit.attach(tiny_llama(), "unipelt", prompt=True, prompt_init="tokens",
                          prompt_init_tokens=tokens, prompt_length=4)  # fmt: skip
    prompt = petl.methods["default"].parts["prompt"].prompt
    assert _rows_of(petl.model.get_input_embeddings().weight, prompt) == [7, 8, 9, 7]


def test_vocab_init_refuses_a_model_without_word_embeddings_or_their_values(vit_case):
    with pytest.raises(petlkit.PetlError, match="no word-embedding table.*init='uniform'"):
        petlkit.attach(vit_case.make(), "prompt", init="vocab")
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(petlkit.PetlError, match="meta device.*load its weights"):
        petlkit.attach(model, "prompt", init="vocab")
    with pytest.raises(petlkit.ConfigError, match="init must be one of"):
        petlkit.attach(tiny_llama(), "prompt", init="sampled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_init_starts_prompts_as_the_given_tokens_repeated_to_the_length(dtype):
    model = tiny_llama().to(dtype)
    petl = petlkit.attach(model, "prompt", length=5, init="tokens", init_tokens=[11, 12])
    prompt = petl.methods["default"].prompt
    assert prompt.dtype == torch.float32 and prompt.requires_grad
    assert _rows_of(model.get_input_embeddings().weight, prompt) == [11, 12, 11, 12, 11]
    petl = petlkit.attach(tiny_llama(), "prompt", length=2, init="tokens", init_tokens=[1, 2, 3])
    assert _rows_of(petl.model.get_input_embeddings().weight, petl.methods["default"].prompt) == [
        1, 2]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"init": "tokens"}, "give init_tokens.*init_text"),
     ({"init_tokens": [3]}, "init_tokens is read only with init='tokens'"),
     ({"init": "tokens", "init_tokens": [3, -1]}, "token ids"),
     ({"init": "tokens", "init_tokens": ["a"]}, "token ids"),
     ({"init": "tokens", "init_tokens": 5}, "token ids")],
)  # fmt: skip
def test_token_init_refuses_bad_ids_up_front(fields, message):
    with pytest.raises(petlkit.ConfigError, match=message):
        petlkit.attach(tiny_llama(), "prompt", **fields)


def test_token_init_refuses_ids_past_the_vocabulary():
    model = tiny_llama()
    size = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(petlkit.PetlError, match=f"reach past the model's {size} word embeddings"):
        petlkit.attach(model, "prompt", init="tokens", init_tokens=[1, size])


def test_text_init_args_tokenize_the_text_with_the_runs_tokenizer():
    from transformers import AutoTokenizer

    from petlkit.backbones.registry import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    ids = tuple(tokenizer("classify the review", add_special_tokens=False)["input_ids"])
    assert text_init_args({"length": 4, "init_text": "classify the review"}, tokenizer) == {
        "length": 4, "init": "tokens", "init_tokens": ids}  # fmt: skip
    assert text_init_args({"prompt_init_text": "classify the review"}, tokenizer) == {
        "prompt_init": "tokens", "prompt_init_tokens": ids}  # fmt: skip
    assert text_init_args({"r": 4}, tokenizer) == {"r": 4}  # nothing to convert
    for bad in ("", "  ", 3):
        with pytest.raises(petlkit.ConfigError, match="init_text must be a non-empty text"):
            text_init_args({"init_text": bad}, tokenizer)
    with pytest.raises(petlkit.ConfigError, match="init_text .* gives no tokens"):
        text_init_args({"init_text": "\x01"}, lambda text, **_: {"input_ids": []})


def test_init_text_from_the_command_line_is_saved_as_token_ids(tmp_path):
    """`--method-arg init_text=...`: the run's tokenizer turns it into ids, the saved adapter
    config holds them, and the run reloads without a tokenizer step."""
    folder = save_tiny_llama(tmp_path / "llama")
    data = lm_files(tmp_path / "data", LM_ROWS)
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(folder), "--method", "prompt", "--method-arg",
                 "init_text=answer the question", "--method-arg", "length=4", "--task",
                 "text-generation", "--data-dir", str(data), "--steps", "1", "--batch-size", "4",
                 "--eval-every", "1", "--output", str(run)]) == 0  # fmt: skip
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("answer the question", add_special_tokens=False)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    method = next(v for v in _dicts(config) if v.get("method") == "prompt")
    assert method["init"] == "tokens" and method["init_tokens"] == ids["input_ids"]
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0


def _dicts(value):
    """Every dict nested in a JSON value."""
    if isinstance(value, dict):
        yield value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _dicts(item)
