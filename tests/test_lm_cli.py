"""The language-model command line on a tiny LLaMA folder (MiniLM's tokenizer beside it):
train → eval → generate → merge, generation's refusals and seeded sampling."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import petlkit.run
from petlkit.cli import main
from petlkit.train import language_model as lm
from tests.helpers import LM_ROWS, lm_files, save_tiny_llama


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cli"))


# -- train, eval, generate, merge ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "sas"])
def test_train_eval_generate_merge_from_the_cli(llama_folder, tmp_path, capsys, method):
    data = lm_files(tmp_path / "data", LM_ROWS)
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(llama_folder), "--method", method, "--task",
                 "text-generation", "--data-dir", str(data), "--steps", "3", "--batch-size", "4",
                 "--eval-every", "3", "--lr", "0.01", "--output", str(run)]) == 0  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["val"] == pytest.approx(results["val"])

    assert main(["generate", "--run", str(run), "--prompt", "question 1 is", "--prompt",
                 "question 2 is", "--max-new-tokens", "4"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["question 1 is", "question 2 is"]

    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(run), "--output", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ours, _, built = petlkit.run.load_run(run)
    ours.merge()
    ours.eval()
    enc = lm.prompt_batch(built.tokenizer, ["question 1 is"], None, "cpu")
    with torch.no_grad():
        expected = ours.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        tokens = plain.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected)


def test_generate_refuses_a_classifier_run_and_no_prompt(llama_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(llama_folder), "--task", "rotten-tomatoes",
                 "--method", "lora", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
                 "--output", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--run", str(run)]) == 2
    assert "give --prompt" in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "--prompt", "hi"]) == 2
    assert "needs a language-model run" in capsys.readouterr().err


def test_generate_samples_reproducibly_with_a_seed(llama_folder, tmp_path, capsys):
    data = lm_files(tmp_path / "data", LM_ROWS)
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(llama_folder), "--method", "lora", "--task",
                 "text-generation", "--data-dir", str(data), "--steps", "1", "--batch-size", "4",
                 "--eval-every", "1", "--output", str(run)]) == 0  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("question 1 is\n\nquestion 2 is\n")
    outputs = []
    for seed in ("0", "0", "1"):
        capsys.readouterr()
        argv = ["generate", "--run", str(run), "--prompt-file", str(prompts), "--sample",
                "--seed", seed, "--temperature", "1.5", "--max-new-tokens", "8"]  # fmt: skip
        assert main(argv) == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert [o["prompt"] for o in outputs[0]] == ["question 1 is", "question 2 is"]  # blank: skipped
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
