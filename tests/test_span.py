"""Extractive QA: SQuAD windows label the answer tokens, decoding finds the answers, and a
span run trains and scores end to end from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from petlkit.backbones.registry import minilm_path
from petlkit.cli import main
from petlkit.tasks.span import best_answers, encode_examples
from petlkit.tasks.squad import read_squad, squad_scores

CONTEXTS = [
    "The Eiffel Tower was finished in 1889 in Paris. It is made of wrought iron.",
    "Marie Curie won two Nobel Prizes, in physics and in chemistry, and lived in Paris.",
]
QAS = [
    (0, "When was the tower finished?", "1889"),
    (0, "What is it made of?", "wrought iron"),
    (1, "How many Nobel Prizes did Curie win?", "two"),
    (1, "Where did she live?", "Paris"),
]


def write_squad(path, repeat=1):
    paragraphs = [{"context": c, "qas": []} for c in CONTEXTS]
    for r in range(repeat):
        for i, (c, q, a) in enumerate(QAS):
            qa = {"id": f"{r}-{i}", "question": q,
                  "answers": [{"text": a, "answer_start": CONTEXTS[c].index(a)}]}  # fmt: skip
            paragraphs[c]["qas"].append(qa)
    path.write_text(
        json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]})
    )


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.mark.parametrize("max_length,stride", [(64, 16), (24, 8)])  # 24 tokens: several windows
def test_window_labels_point_at_the_answer(tmp_path, tokenizer, max_length, stride):
    write_squad(tmp_path / "q.json")
    examples = read_squad(tmp_path / "q.json")
    split = encode_examples(examples, tokenizer, max_length=max_length, stride=stride)
    found = 0
    for i, (start, end) in enumerate(split.labels.tolist()):
        if start == 0:
            continue
        example = examples[split.inputs.example[i]]
        offsets = split.inputs.offsets[i]
        assert example.context[offsets[start][0] : offsets[end][1]] == example.answers[0]
        found += 1
    assert found >= len(examples)  # every answer is labelled in at least one window


def test_decoding_perfect_logits_gives_exact_match(tmp_path, tokenizer):
    write_squad(tmp_path / "q.json")
    examples = read_squad(tmp_path / "q.json")
    split = encode_examples(examples, tokenizer, max_length=64, stride=16)
    logits = torch.zeros(len(split), 64, 2)
    for i, (start, end) in enumerate(split.labels.tolist()):
        logits[i, start, 0] = logits[i, end, 1] = 10.0
    answers = best_answers(logits, split.inputs, examples)
    assert squad_scores(answers, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_run_from_the_cli(tmp_path, tokenizer, capsys):
    backbone = tmp_path / "tiny-bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37)  # fmt: skip
    BertModel(config, add_pooling_layer=False).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    data = tmp_path / "squad"
    data.mkdir()
    write_squad(data / "train-v1.1.json", repeat=260)  # 1,040 questions: 1,000 held out for val
    write_squad(data / "dev-v1.1.json")
    out = tmp_path / "run"
    args = [
        "train",
        "--backbone",
        str(backbone),
        "--method",
        "lora",
        "--task",
        "squad",
        "--data-dir",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--output",
        str(out),
    ]
    with open(tmp_path / "run.json", "w") as f:
        json.dump({"train": {"max_length": 64}}, f)
    assert main([*args, "--config", str(tmp_path / "run.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"exact_match", "f1"}
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == results["test"]
