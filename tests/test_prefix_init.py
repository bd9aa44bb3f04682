"""Prefix tuning started from real tokens (init='tokens'; `init_text` on the command line and in
the bench): the prefix is the keys and values the model itself gives the tokens, so on a causal
model a prefixed input reads exactly as the same input after those tokens."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import petlkit
from petlkit.cli import main
from petlkit.layout import layout_of
from petlkit.methods.prefix_init import token_key_values
from tests.families import BY_NAME
from tests.helpers import LM_ROWS, lm_files, save_tiny_llama

IDS = torch.tensor([[7, 30, 41, 12, 9]])


def _as_context(family: str, length: int, tokens: list[int], dtype=torch.float32):
    """(the model's logits for IDS after `tokens` repeated to `length`, those for IDS under a
    prefix started from them): the prefixed input gets the positions it has after the tokens."""
    model = BY_NAME[family].make().to(dtype)
    context = torch.tensor([tokens]).repeat(1, length)[:, :length]
    with torch.no_grad():
        reference = model(input_ids=torch.cat([context, IDS], 1)).logits[:, length:]
    petl = petlkit.attach(model, "prefix", length=length, init="tokens", init_tokens=tokens,
                          reparameterize=False)  # fmt: skip
    positions = torch.arange(length, length + IDS.shape[1])[None]
    with torch.no_grad():
        prefixed = petl(input_ids=IDS, position_ids=positions).logits
    return reference, prefixed, petl


# GPT-2: fused q|k|v (Conv1D) and learned absolute positions, so any length matches. Rotary
# decoders: prefix keys carry no rotation, which equals a real key only at position 0 (length 1).
@pytest.mark.parametrize(
    ("family", "length", "tokens"),
    [("gpt2", 3, [15, 22]), ("gpt2", 2, [15, 22, 40]), ("llama", 1, [15]),
     ("gpt-neox", 1, [15]), ("qwen2", 1, [40])],
)  # fmt: skip
def test_a_token_started_prefix_reads_as_those_tokens_in_front(family, length, tokens):
    reference, prefixed, _ = _as_context(family, length, tokens)
    torch.testing.assert_close(prefixed, reference, atol=1e-5, rtol=1e-5)


def test_a_bf16_model_gets_float32_values_of_its_own_bf16_activations():
    reference, prefixed, petl = _as_context("gpt2", 3, [15, 22], torch.bfloat16)
    assert petl.methods["default"].prefix.dtype == torch.float32
    torch.testing.assert_close(prefixed.float(), reference.float(), atol=0.1, rtol=0.05)


def test_the_values_come_back_float32_on_the_cpu_whatever_the_model_runs_in():
    """The method places and casts them with its other tensors; the capture itself must not hand
    back bf16 (a bf16 start rounds the model's activations before the float32 parameter)."""
    model = BY_NAME["gpt2"].make().to(torch.bfloat16)
    values = token_key_values(model, layout_of(model), (15, 22), 3)
    assert values.dtype == torch.float32 and values.device.type == "cpu"
    assert values.shape == (3, 2 * 2 * 32)  # tokens, blocks · keys|values · width


def test_a_model_in_training_mode_gives_the_values_it_gives_in_eval_mode():
    """Dropout is off for the capture: a model attached straight after training gets the same
    start as an evaluated one (BERT here has dropout 0.1 on attention and hidden states)."""
    model = BY_NAME["bert"].make()
    start = dict(length=4, init="tokens", init_tokens=[5, 6], reparameterize=False)
    expected = petlkit.attach(copy.deepcopy(model), "prefix", **start).methods["default"].prefix
    torch.manual_seed(0)
    trained = petlkit.attach(model.train(), "prefix", **start).methods["default"].prefix
    torch.testing.assert_close(trained, expected)


def test_a_model_whose_forward_skips_a_block_is_refused():
    """A block the tokens never reach would keep a zero prefix: refused, with the way out."""
    model = BY_NAME["llama"].make()
    model.config.num_hidden_layers = 1  # the forward runs only the first of its two layers
    with pytest.raises(petlkit.PetlError, match=r"did not reach \['model.layers.1.*init='random'"):
        petlkit.attach(model, "prefix", init="tokens", init_tokens=[5], reparameterize=False)


def test_capturing_leaves_the_model_as_it_was():
    """The capture's hooks are gone and the model is back in its mode: a token-started prefix
    leaves the same hooks as a random one."""

    def hooks(petl) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in petl.modules())

    random = petlkit.attach(BY_NAME["llama"].make().train(), "prefix", length=2)
    petl = petlkit.attach(BY_NAME["llama"].make().train(), "prefix", length=2, init="tokens",
                          init_tokens=[5, 6], reparameterize=False)  # fmt: skip
    assert petl.model.training  # the capture ran in eval mode and gave the mode back
    assert hooks(petl) == hooks(random)


def test_an_encoder_starts_from_the_keys_and_values_of_its_own_layers():
    model = BY_NAME["bert"].make()
    tokens = torch.tensor([[5, 6, 5, 6]])
    with torch.no_grad():
        states = model(input_ids=tokens, output_hidden_states=True).hidden_states
    petl = petlkit.attach(model, "prefix", length=4, init="tokens", init_tokens=[5, 6],
                          reparameterize=False)  # fmt: skip
    values = petl.methods["default"].prefix.detach().view(4, 2, 2, 32)  # tokens, blocks, k|v
    for i, layer in enumerate(model.bert.encoder.layer):
        attention = layer.attention.self
        with torch.no_grad():
            torch.testing.assert_close(values[:, i, 0], attention.key(states[i][0]))
            torch.testing.assert_close(values[:, i, 1], attention.value(states[i][0]))


def test_an_encoder_decoder_runs_the_tokens_through_both_stacks():
    petl = petlkit.attach(BY_NAME["t5"].make(), "prefix", length=3, init="tokens",
                          init_tokens=[5, 6], reparameterize=False)  # fmt: skip
    method = petl.methods["default"]
    values = method.prefix.detach().view(3, method.layout.depth, -1)
    assert values.isfinite().all() and (values.abs().sum(dim=(0, 2)) > 0).all()  # every block


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"init": "tokens", "init_tokens": [3]}, "reparameterize=False"),
     ({"init": "tokens", "reparameterize": False}, "give init_tokens.*init_text"),
     ({"init_tokens": [3], "reparameterize": False}, "read only with init='tokens'"),
     ({"init": "words", "reparameterize": False}, "init must be one of")],
)  # fmt: skip
def test_token_init_refuses_inconsistent_fields_up_front(fields, message):
    with pytest.raises(petlkit.ConfigError, match=message):
        petlkit.make_config("prefix", **fields)


def test_token_init_refuses_models_it_cannot_run_on_tokens(vit_case):
    start = dict(init="tokens", init_tokens=[3], reparameterize=False)
    with pytest.raises(petlkit.PetlError, match="no word-embedding table.*init='random'"):
        petlkit.attach(vit_case.make(), "prefix", **start)
    with torch.device("meta"):
        model = BY_NAME["llama"].make()
    with pytest.raises(petlkit.PetlError, match="meta device.*init='random'"):
        petlkit.attach(model, "prefix", **start)
    with pytest.raises(petlkit.PetlError, match=r"reach past the model's 99 word embeddings"):
        petlkit.attach(BY_NAME["llama"].make(), "prefix", **{**start, "init_tokens": [3, 99]})


def test_init_text_starts_a_prefix_from_the_command_line(tmp_path):
    """`--method-arg init_text=...` tokenizes the text with the run's tokenizer; the trained
    adapter reloads (its values replace the start) and evaluates."""
    folder = save_tiny_llama(tmp_path / "llama")
    data = lm_files(tmp_path / "data", LM_ROWS)
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(folder), "--method", "prefix", "--method-arg",
                 "init_text=answer the question", "--method-arg", "reparameterize=false",
                 "--method-arg", "length=3", "--task", "text-generation", "--data-dir",
                 str(data), "--steps", "1", "--batch-size", "4", "--eval-every", "1",
                 "--output", str(run)]) == 0  # fmt: skip
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("answer the question", add_special_tokens=False)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    method = config if config.get("method") == "prefix" else config["method"]
    assert method["init"] == "tokens" and method["init_tokens"] == ids["input_ids"]
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0
