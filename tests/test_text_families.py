"""BERT-family variants beyond BERT itself (RoBERTa and MPNet layouts work with every method), and
the random-weight BERT-base shape."""

from __future__ import annotations

import pytest
import torch
from transformers import MPNetConfig, MPNetModel, RobertaConfig, RobertaModel

import petlkit
from petlkit.backbones import TextClassifier
from tests.helpers import train_steps

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64)  # fmt: skip
FAMILIES = {
    "roberta": lambda: RobertaModel(RobertaConfig(**SMALL), add_pooling_layer=False),
    "mpnet": lambda: MPNetModel(MPNetConfig(**SMALL), add_pooling_layer=False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["sas", "lora", "adapter", "bitfit", "ssf", "prompt"])
def test_family_trains_and_merges(family, method):
    torch.manual_seed(0)
    model = petlkit.attach(TextClassifier(FAMILIES[family](), 2).eval(), method)
    ids = torch.randint(5, 99, (2, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    train_steps(model, inputs, torch.tensor([0, 1]))
    model.eval()
    expected = model(**inputs)
    if model.methods["default"].merge_refusal is not None:
        with pytest.raises(petlkit.NotMergeableError):
            model.merge()
        return
    model.merge()
    assert (model(**inputs) - expected).abs().max() <= 1e-5


def test_mpnet_layout_names_its_own_modules():
    layout = TextClassifier(FAMILIES["mpnet"](), 2).petl_layout()
    block = layout.blocks[1]
    assert block.query == "encoder.encoder.layer.1.attention.attn.q"
    assert block.attn_out == "encoder.encoder.layer.1.attention.attn.o"
    assert block.mlp_linears == ("encoder.encoder.layer.1.intermediate.dense",)


def test_roberta_takes_unipelt_with_prompt():
    torch.manual_seed(0)
    model = petlkit.attach(TextClassifier(FAMILIES["roberta"](), 2).eval(), "unipelt-prompt",
                           prefix_length=3, prefix_hidden=8, lora_r=2, prompt_length=2)  # fmt: skip
    ids = torch.randint(5, 99, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    before = model(**inputs).detach()
    train_steps(model, inputs, torch.tensor([0, 1]))
    assert not torch.allclose(model(**inputs), before)
    assert model.model.encoder.config._attn_implementation == "petlkit_sdpa"


def test_bert_base_shape_is_bert_base_with_a_matching_tokenizer():
    """The random-weight `bert-base-shape` (for counts and GPU timing): BERT-base's layout, and
    the uncased 30,522-token tokenizer it shares with MiniLM-L6."""
    from petlkit import build_model

    built = build_model("bert-base-shape", 2)
    config = built.model.encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size, config.vocab_size) == (12, 768, 12, 3072, 30522)  # fmt: skip
    # BERT-base's 109,482,240 parameters less the pooler (768·768 + 768), which we do not build
    assert sum(p.numel() for p in built.model.encoder.parameters()) == 108_891_648
    assert len(built.tokenizer) == config.vocab_size
    ids = built.tokenizer(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        assert built.model(**ids).shape == (1, 2)
