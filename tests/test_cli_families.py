"""`petlkit train` and `eval` on a transformers folder of a family other than BERT's: a tiny
LLaMA decoder (MiniLM's tokenizer beside it), trained on Rotten Tomatoes as a classifier."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

import petlkit
from petlkit.backbones import build_model
from petlkit.backbones.registry import minilm_path
from petlkit.cli import main
from petlkit.layout import layout_of


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, intermediate_size=8,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(folder)
    return folder


def test_build_model_reads_a_folder_of_any_supported_family(llama_folder):
    built = build_model(str(llama_folder), 2, pooling="last")
    assert type(built.model.encoder).__name__ == "LlamaModel"
    petl = petlkit.attach(built.model, "unipelt-prompt")
    batch = built.tokenizer(["a gem", "tedious and long"], return_tensors="pt", padding=True)
    assert petl(**batch).shape == (2, 2)
    layout = layout_of(built.model)
    assert layout.causal and layout.key_value_heads == 2


@pytest.mark.parametrize("method", ["sas", "prefix"])
def test_train_and_eval_on_a_decoder_folder(llama_folder, tmp_path, method, capsys):
    out = tmp_path / "run"
    args = ["train", "--backbone", str(llama_folder), "--task", "rotten-tomatoes", "--method",
            method, "--steps", "2", "--batch-size", "4", "--eval-every", "2",
            "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["val"] == results["val"]


def test_the_trainer_takes_a_transformers_classifier_as_it_is(tmp_path):
    """The user's own *ForSequenceClassification returns a ModelOutput; the trainer reads its
    logits."""
    from transformers import BertConfig, BertForSequenceClassification

    from petlkit.tasks.registry import load_task
    from petlkit.train.config import TrainConfig
    from petlkit.train.trainer import Trainer

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_labels=2,
                        num_attention_heads=4, intermediate_size=37)  # fmt: skip
    torch.manual_seed(0)
    petl = petlkit.attach(BertForSequenceClassification(config), "lora", r=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    task = load_task("rotten-tomatoes")
    before = {n: p.detach().clone() for n, p in petl.named_parameters() if p.requires_grad}
    result = Trainer(petl, task, TrainConfig(steps=2, batch_size=4, eval_every=2,
                                             checkpoint_every=0, eval_batch_size=256),
                     tokenizer=tokenizer, progress=False).fit()  # fmt: skip
    assert 0 <= result["val"]["accuracy"] <= 1
    assert any(not torch.equal(p, before[n]) for n, p in petl.named_parameters() if n in before)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_pooling_reads_the_last_real_token_whichever_side_pads(llama_folder, side):
    classifier = build_model(str(llama_folder), 2, pooling="last").model
    hidden = torch.arange(10, dtype=torch.float32).view(2, 5, 1)  # position t holds t (+5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    if side == "left":
        mask = mask.flip(1)  # [[0, 0, 1, 1, 1], ...]: the last real token is the last position
    expected = [2.0, 9.0] if side == "right" else [4.0, 9.0]
    assert classifier.pool(hidden, mask).squeeze(-1).tolist() == expected
