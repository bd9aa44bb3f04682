"""Language-model tasks on a decoder: completion-only loss, chat templates, packing, the loss of
the global batch, scores, and the command line (train → eval → generate → merge) on a tiny LLaMA
folder (MiniLM's tokenizer beside it)."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import petlkit
import petlkit.run
from petlkit.backbones.registry import minilm_path
from petlkit.errors import PetlError
from petlkit.tasks import load_task
from petlkit.tasks.generation import Example, lm_task
from petlkit.tasks.metrics import selection_value
from petlkit.train import language_model as lm
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer
from tests.helpers import LM_ROWS, lm_files, nothing_written, one_line_error, tiny_llama

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama-lm")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed).eval()


# -- what the loss counts ----------------------------------------------------------------------
def test_the_loss_counts_exactly_the_completion_tokens(tokenizer):
    example = Example(" good film", "the review says")
    ids, labels = lm.tokenize(example, tokenizer, max_length=64)
    prompt = tokenizer("the review says")["input_ids"]
    answer = tokenizer(" good film", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer  # MiniLM's tokenizer has no end-of-text token to append
    assert labels == [lm.IGNORE] * len(prompt) + answer

    batch = lm.padded([(ids, labels), ([5, 6], [lm.IGNORE, 6])], pad_id=0)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert (batch["labels"][1, 2:] == lm.IGNORE).all() and batch["labels"][1, 1] == 6


def test_an_end_of_text_token_closes_each_completion(tokenizer):
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tok.eos_token = "[SEP]"
    ids, labels = lm.tokenize(Example(" yes", "q"), tok, 64)
    assert ids[-1] == labels[-1] == tok.eos_token_id


def test_too_long_examples_keep_their_completion(tokenizer):
    example = Example(" the answer", "word " * 50)
    ids, labels = lm.tokenize(example, tokenizer, max_length=8)
    answer = tokenizer(" the answer", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and ids[-len(answer) :] == answer and labels[-len(answer) :] == answer


def test_the_nll_skips_masked_labels_and_shifts_by_one():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[lm.IGNORE, lm.IGNORE, 3, 5]])
    nll, count = lm.completion_nll(logits, labels)
    expected = -(logits[0, 1].log_softmax(-1)[3] + logits[0, 2].log_softmax(-1)[5])
    assert count == 2 and torch.allclose(nll, expected)


# -- chat templates ----------------------------------------------------------------------------
def test_chat_messages_render_with_the_tokenizers_template(tokenizer):
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tok.chat_template = CHAT
    example = Example("fine", messages=(("system", "be brief"), ("user", "how are you?"),
                                        ("assistant", "fine")))  # fmt: skip
    prompt, completion = example.render(tok)
    assert prompt == "<system>be brief</s><user>how are you?</s><assistant>"
    assert completion == "fine</s>"
    with pytest.raises(PetlError, match="no chat template"):
        example.render(tokenizer)


def test_chat_files_are_read_and_bad_rows_refused(tmp_path):
    chat = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    task = load_task("text-generation", lm_files(tmp_path / "ok", [chat] * 3))
    assert task.modality == "lm" and task.splits["train"].inputs[0].completion == "hello"
    bad = {
        "no completion": ({"prompt": "x"}, "has no 'completion' column"),
        "empty": ({"prompt": "x", "completion": " "}, "empty completion"),
        "last not assistant": (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            "last message must be the assistant's",
        ),  # fmt: skip
        "role": (
            {"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "has role 'bot'",
        ),  # fmt: skip
    }
    for name, (row, message) in bad.items():
        folder = lm_files(tmp_path / name.replace(" ", "-"), [row])
        with pytest.raises(PetlError, match=message) as err:
            load_task("text-generation", folder)
        assert "record 1" in str(err.value), name


def test_a_bad_row_fails_the_cli_in_one_line_before_any_file(llama_folder, tmp_path, capsys):
    data = lm_files(tmp_path / "data", [*LM_ROWS[:3], {"prompt": "x"}])
    argv = [
        "train",
        "--backbone",
        str(llama_folder),
        "--method",
        "lora",
        "--task",
        "text-generation",
        "--data-dir",
        str(data),
        "--output",
        str(tmp_path / "out"),
    ]
    one_line_error(capsys, argv, "record 4 has no 'completion' column")
    assert nothing_written(tmp_path)


# -- packing -----------------------------------------------------------------------------------
def test_packing_keeps_examples_apart(tokenizer):
    model = _tiny_lm()
    examples = [Example(" first answer", "one prompt"), Example(" second", "another longer prompt"),
                Example(" third one here", "x")]  # fmt: skip
    seqs = [lm.tokenize(e, tokenizer, 64) for e in examples]
    batch = lm.packed(seqs, max_length=64, pad_id=0)
    assert batch["input_ids"].shape[0] == 1  # all three fit one row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[:3] == [0, len(seqs[0][0]), len(seqs[0][0]) + len(seqs[1][0])]
    with torch.no_grad():
        packed_logits = model(
            **{k: v for k, v in batch.items() if k != "labels"}, use_cache=False
        ).logits
        at = 0
        for ids, _ in seqs:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            packed_part = packed_logits[0, at : at + len(ids)]
            torch.testing.assert_close(packed_part, alone, atol=1e-5, rtol=0)
            at += len(ids)


def test_packing_starts_a_new_row_when_the_next_example_does_not_fit():
    seqs = [([1] * 5, [1] * 5), ([2] * 4, [2] * 4), ([3] * 3, [3] * 3)]
    batch = lm.packed(seqs, max_length=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[1] * 5 + [0] * 2, [2] * 4 + [3] * 3]  # the longest row
    assert (batch["labels"][0, 5:] == lm.IGNORE).all()


def test_the_trainers_packed_batches_give_the_unpacked_loss(tokenizer, tmp_path):
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    petl = petlkit.attach(_tiny_lm(), "lora")
    config = TrainConfig(steps=1, batch_size=6, max_length=64, packing=True)
    trainer = Trainer(petl, task, config, None, tokenizer, progress=False)
    index = torch.arange(6)
    packed_inputs, packed_labels = trainer.encode(task.splits["train"], index, training=True)
    plain_inputs, plain_labels = trainer.encode(task.splits["train"], index)
    assert packed_inputs["input_ids"].shape[0] < 6  # rows joined
    with torch.no_grad():
        packed = lm.completion_nll(petl(**packed_inputs).logits, packed_labels)
        plain = lm.completion_nll(petl(**plain_inputs).logits, plain_labels)
    assert packed[1] == plain[1]
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_methods_that_add_tokens(tokenizer, tmp_path):
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    for method in ("prefix", "prompt", "unipelt"):
        petl = petlkit.attach(_tiny_lm(), method)
        with pytest.raises(PetlError, match="packing keeps examples apart"):
            Trainer(petl, task, TrainConfig(steps=1, batch_size=4, packing=True), None, tokenizer)


# -- the trainer -------------------------------------------------------------------------------
def _train(tokenizer, task, method="lora", **settings):
    torch.manual_seed(0)
    petl = petlkit.attach(_tiny_lm(), method)
    config = TrainConfig(**{"steps": 3, "batch_size": 4, "eval_every": 0, "lr": 1e-2,
                            "max_length": 32, **settings})  # fmt: skip
    trainer = Trainer(petl, task, config, None, tokenizer, progress=False)
    trainer.fit()
    return petl, trainer


def _trained(petl):
    return {n: p.detach().clone() for n, p in petl.named_parameters() if p.requires_grad}


def test_the_step_loss_is_the_token_mean_of_the_global_batch(tokenizer, tmp_path):
    """Examples have completions of different lengths; the loss weighs every completion token
    alike whatever the micro-batches, so gradient accumulation equals the full batch."""
    rows = [{"prompt": f"q{i}", "completion": " a" * (1 + i % 4)} for i in range(8)]
    task = load_task("text-generation", lm_files(tmp_path, rows))
    full, _ = _train(tokenizer, task)
    accumulated, _ = _train(tokenizer, task, grad_accum=2)
    for name, value in _trained(full).items():
        torch.testing.assert_close(_trained(accumulated)[name], value, atol=1e-6, rtol=1e-5)


def test_scores_and_selection_of_a_label_word_task(tokenizer, tmp_path):
    rows = [("a gem of a film", 1), ("tedious", 0), ("loved it", 1), ("dull and long", 0)] * 2
    splits = {s: [Example((" bad", " good")[y], f"Review: {t}\nSentiment:") for t, y in rows]
              for s in ("train", "val", "test")}  # fmt: skip
    labels = {s: [y for _, y in rows] for s in splits}
    task = lm_task("tiny-sentiment", splits, labels, (" bad", " good"))
    petl, trainer = _train(tokenizer, task)
    assert list(trainer.evaluate("val")) == ["accuracy", "perplexity"]  # no generation
    scores = trainer.evaluate("test")
    assert list(scores) == ["accuracy", "exact_match", "perplexity"]
    chosen = lm.verbalised_choice(
        petl,
        task.splits["test"].inputs,
        task.label_names,
        tokenizer,
        32,
        8,
        "cpu",
        contextlib.nullcontext,
    )
    assert scores["accuracy"] == float((chosen == task.splits["test"].labels).float().mean())
    assert 0 <= scores["exact_match"] <= 1 and scores["perplexity"] > 1


def test_model_selection_keeps_the_lowest_perplexity(tokenizer, tmp_path):
    assert selection_value({"perplexity": 3.0}) == pytest.approx(-math.log(3.0))
    assert selection_value({"accuracy": 0.5, "perplexity": 3.0}) == 0.5
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    out = tmp_path / "run"
    torch.manual_seed(0)
    petl = petlkit.attach(_tiny_lm(), "lora")
    config = TrainConfig(steps=6, batch_size=4, eval_every=1, lr=0.5, max_length=32)
    results = Trainer(petl, task, config, out, tokenizer, progress=False).fit()
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min(curve, key=lambda r: r["val"]["perplexity"])
    assert results["best_step"] == best["step"]
    assert results["val"]["perplexity"] == pytest.approx(best["val"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix", "sas"])
def test_activation_checkpointing_on_a_transformers_decoder_gives_the_same_step(
    tokenizer, tmp_path, method
):
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    plain, _ = _train(tokenizer, task, method)
    checkpointed, _ = _train(tokenizer, task, method, activation_checkpointing=True)
    assert checkpointed.model.model.gradient_checkpointing  # switched on, not just harmless
    assert not plain.model.model.gradient_checkpointing
    for name, value in _trained(plain).items():
        torch.testing.assert_close(_trained(checkpointed)[name], value, atol=1e-6, rtol=1e-5)


def test_a_bf16_base_trains_float32_tensors(tokenizer, tmp_path):
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    petl = petlkit.attach(_tiny_lm().to(torch.bfloat16), "sas")
    config = TrainConfig(steps=2, batch_size=4, eval_every=0, lr=1e-2, max_length=32)
    trainer = Trainer(petl, task, config, None, tokenizer, progress=False)
    results = trainer.fit()
    trained = _trained(petl)
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    frozen = [p for p in petl.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert results["peak_memory_mb"] > 0 and results["val"]["perplexity"] > 1


def test_built_in_language_model_tasks():
    sentiment = load_task("sentiment-gen")
    example = sentiment.splits["train"].inputs[0]
    assert example.prompt.startswith("Review: ") and example.prompt.endswith("\nSentiment:")
    assert example.completion == sentiment.label_names[int(sentiment.splits["train"].labels[0])]
    products = load_task("lm-products")
    assert products.label_names is None and products.splits["val"].inputs[0].prompt == ""
    assert {len(s) for s in products.splits.values()} == {2589, 369, 739}


def test_the_verbalised_label_is_the_word_the_prompt_makes_most_likely(tokenizer):
    model = _tiny_lm(3)
    example = Example(" good", "Review: fine\nSentiment:")
    words = (" bad", " good", " movie")
    chosen = lm.verbalised_choice(model, [example], words, tokenizer, 32, 8, "cpu",
                                  contextlib.nullcontext)  # fmt: skip
    prompt = tokenizer(example.prompt)["input_ids"]
    scores = []
    with torch.no_grad():
        for word in words:
            answer = tokenizer(word, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)))
    assert int(chosen[0]) == int(torch.tensor(scores).argmax())


REVIEWS = [Example(w, f"Review: {text}\nSentiment:") for w, text in [
    (" good", "fine acting"), (" bad", "a long, dull and very slow film " * 3), (" good", "yes"),
    (" bad", "no"), (" good", "the best of the year"), (" bad", "poor")]]  # fmt: skip


class _Counted(torch.nn.Module):
    """A model whose forwards are counted."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **inputs):
        self.calls += 1
        return self.model(**inputs)


LONGER = [Example(" excellently", "Review: so very well made, " * 3 + "\nSentiment:")] + REVIEWS


@pytest.mark.parametrize(
    ("words", "examples", "max_length", "one_pass"),
    [((" bad", " good"), REVIEWS, 64, True), ((" bad", " good"), REVIEWS, 12, True),  # cut to fit
     ((" bad", " good"), LONGER, 64, True),  # a longer completion, the prompts whole
     ((" bad", " good"), LONGER, 12, False),  # cut shorter than its candidates' prompts
     ((" bad", " good"), [Example(" good", "")] + REVIEWS, 64, False),  # no prompt to score after
     ((" bad", " good", " excellently"), REVIEWS, 64, False)],  # a word of several tokens
)  # fmt: skip
def test_label_scores_are_the_choice_and_perplexity_in_one_pass(tokenizer, words, examples,
                                                                max_length, one_pass):  # fmt: skip
    model = _Counted(_tiny_lm(3))
    args = (tokenizer, max_length, 4, "cpu", contextlib.nullcontext)
    chosen, ppl = lm.label_scores(model, examples, words, *args)
    calls, model.calls = model.calls, 0
    expected = lm.verbalised_choice(model, examples, words, *args)
    assert torch.equal(chosen, expected)
    assert ppl == pytest.approx(lm.perplexity(model, examples, *args), rel=1e-5)
    batches = math.ceil(len(examples) / 4)
    assert calls == (batches if one_pass else model.calls)  # one forward per batch, or both


def test_label_scores_of_chat_examples_take_the_two_passes(tokenizer, monkeypatch):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT
    examples = [Example(" good", "", (("user", "fine"), ("assistant", " good")))] * 3
    called = []
    monkeypatch.setattr(lm, "verbalised_choice", lambda *a: called.append(1) or torch.zeros(3))
    lm.label_scores(_tiny_lm(), examples, (" bad", " good"), tokenizer, 32, 4, "cpu",
                    contextlib.nullcontext)  # fmt: skip
    assert called == [1]


class _Parrot(torch.nn.Module):
    """generate() answers each prompt with fixed text: exact match is then known."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, input_ids, attention_mask, **_):
        tails = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in self.answers]
        width = max(len(t) for t in tails)
        tails = torch.tensor([t + [0] * (width - len(t)) for t in tails])
        return torch.cat([input_ids, tails], dim=1)


def test_exact_match_compares_the_normalised_first_words(tokenizer):
    examples = [Example(" positive", "a"), Example(" negative", "b"), Example(" Positive!", "c")]
    said = ["positive.", "positive", "POSITIVE and more"]
    score = lm.exact_match(_Parrot(tokenizer, said), examples, tokenizer, 32, 8, "cpu",
                           contextlib.nullcontext)  # fmt: skip
    assert score == pytest.approx(2 / 3)
    assert lm.normalise("  Positive!\n") == "positive"


def test_a_base_model_without_a_method_evaluates_and_refuses_to_train(tokenizer, tmp_path):
    task = load_task("text-generation", lm_files(tmp_path, LM_ROWS))
    trainer = Trainer(petlkit.PetlModel(_tiny_lm()), task, TrainConfig(steps=1, batch_size=4),
                      None, tokenizer, progress=False)  # fmt: skip
    assert trainer.evaluate("val")["perplexity"] > 1
    with pytest.raises(PetlError, match="nothing to train"):
        trainer.fit()
