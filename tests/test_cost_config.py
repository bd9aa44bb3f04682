"""`petlkit cost` on a transformers config alone: the architecture built on the meta device, no
weights read or made, counted as the same architecture with weights is."""

from __future__ import annotations

import pytest
from transformers import (
    BertConfig,
    CLIPVisionConfig,
    LlamaConfig,
    PretrainedConfig,
    SiglipTextConfig,
    ViTConfig,
)

from petlkit.cost.cases import FLOOR, _built, build_case, case_from_config, count
from petlkit.errors import PetlError

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=500)  # fmt: skip


@pytest.fixture(params=["bert", "llama"])
def config_folder(request, tmp_path):
    if request.param == "bert":
        BertConfig(**SHAPE).save_pretrained(tmp_path)
    else:
        LlamaConfig(num_key_value_heads=2, **SHAPE).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("method", [FLOOR, "sas", "unipelt-prompt"])
def test_a_config_is_counted_as_the_same_model_with_weights(config_folder, method):
    without = case_from_config(config_folder / "config.json", batch=2, size=8)
    assert next(without.model.parameters()).is_meta  # nothing was made
    weighted = case_from_config(config_folder / "config.json", batch=2, size=8, device="cpu")
    assert count(without, method).totals() == count(weighted, method).totals()


def test_a_folder_or_its_config_file_names_the_backbone(config_folder):
    by_folder = build_case(str(config_folder), batch=2, size=8)
    by_file = build_case(str(config_folder / "config.json"), batch=2, size=8)
    assert by_folder.family == by_file.family == "text"
    assert count(by_folder, "lora").totals() == count(by_file, "lora").totals()
    decoder = "llama" in type(by_folder.model.encoder).__name__.lower()
    assert by_folder.model.pooling == ("last" if decoder else "cls")
    ids = by_folder.batch["input_ids"]
    assert ids.shape == (2, 8) and int(ids.max()) < SHAPE["vocab_size"]


def test_the_cost_command_counts_a_config_and_refuses_one_without_a_vocabulary(tmp_path, capsys):
    from petlkit.cli import main

    LlamaConfig(num_key_value_heads=2, **SHAPE).save_pretrained(tmp_path / "llama")
    code = main(["cost", "--backbone", str(tmp_path / "llama"), "--batch", "2", "--size", "8",
                 "--methods", "lora", "--no-folded"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| lora |" in out and "| floor |" in out
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64).save_pretrained(tmp_path / "clip")  # fmt: skip
    with pytest.raises(PetlError, match="no image classifier from CLIPVisionConfig.*CLIPVisionFor"):
        build_case(str(tmp_path / "clip"), batch=2, size=8)
    BertConfig(**SHAPE).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "config.json").write_text(
        (tmp_path / "bert" / "config.json")
        .read_text()
        .replace('"vocab_size": 500', '"vocab_size": 0')
    )
    with pytest.raises(PetlError, match="text model's config .* or an image model's"):
        build_case(str(tmp_path / "bert"), batch=2, size=8)


@pytest.mark.parametrize("method", [FLOOR, "lora", "ssf"])
def test_an_image_classifiers_config_is_counted_at_the_size_asked(tmp_path, method):
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4).save_pretrained(tmp_path)  # fmt: skip
    without = case_from_config(tmp_path / "config.json", batch=2, size=32)
    assert without.family == "vision" and without.batch["pixel_values"].shape == (2, 3, 32, 32)
    assert type(without.model).__name__ == "ViTForImageClassification"
    weighted = case_from_config(tmp_path / "config.json", batch=2, size=32, device="cpu")
    counted = count(without, method)
    assert counted.totals() == count(weighted, method).totals()
    assert counted.syncs == 0


def test_a_text_tower_automodel_does_not_map_is_built_from_its_own_class(tmp_path):
    SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=500).save_pretrained(tmp_path)  # fmt: skip
    without = case_from_config(tmp_path / "config.json", batch=2, size=8)
    assert type(without.model.encoder).__name__ == "SiglipTextModel"
    weighted = case_from_config(tmp_path / "config.json", batch=2, size=8, device="cpu")
    assert count(without, "lora").totals() == count(weighted, "lora").totals()


def test_a_config_with_no_model_class_is_named(tmp_path):
    class NoSuchConfig(PretrainedConfig):
        model_type = "no-such"

    with pytest.raises(PetlError, match="no model from NoSuchConfig.*AutoModel's and NoSuchModel"):
        _built(NoSuchConfig(), tmp_path / "config.json", "AutoModel", "Model", "model")
