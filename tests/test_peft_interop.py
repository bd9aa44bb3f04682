"""A LoRA trained here loads into HF PEFT, and a PEFT LoRA loads here: identical outputs."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import petlkit
from petlkit.errors import CheckpointError, PetlError
from petlkit.interop.peft import export_peft_lora, import_peft_lora
from tests.conftest import minilm_case
from tests.helpers import train_steps


@pytest.fixture(scope="module")
def minilm():
    return minilm_case()


def _hidden(encoder, inputs):
    with torch.no_grad():
        return encoder(**inputs).last_hidden_state


def test_export_to_peft_gives_identical_outputs(minilm, tmp_path):
    ours = petlkit.attach(minilm.make(), "lora", r=4, alpha=8)
    train_steps(ours, minilm.inputs, minilm.labels, lr=5e-2)  # non-zero B
    export_peft_lora(ours, tmp_path)
    theirs = PeftModel.from_pretrained(minilm.make().encoder, tmp_path).eval()
    ours.eval()
    diff = (_hidden(ours.model.encoder, minilm.inputs) - _hidden(theirs, minilm.inputs)).abs()
    assert diff.max() <= 1e-5
    assert (
        _hidden(ours.model.encoder, minilm.inputs) - _hidden(minilm.make().encoder, minilm.inputs)
    ).abs().max() > 1e-3


def test_import_from_peft_gives_identical_outputs(minilm, tmp_path):
    torch.manual_seed(7)
    peft = get_peft_model(
        minilm.make().encoder,
        LoraConfig(r=2, lora_alpha=6, target_modules=["query", "key", "dense"]),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft.save_pretrained(tmp_path)
    ours = import_peft_lora(minilm.make(), tmp_path).eval()
    # q, k and the three "dense" linears (attention output, FFN in, FFN out) in 6 blocks
    assert len(ours.methods["default"].tuners(ours.model)) == 6 * 5
    diff = (_hidden(ours.model.encoder, minilm.inputs) - _hidden(peft.eval(), minilm.inputs)).abs()
    assert diff.max() <= 1e-5


def test_what_peft_cannot_hold_is_refused(minilm, vit_case, tmp_path):
    with pytest.raises(PetlError, match="not a plain LoRA"):
        export_peft_lora(petlkit.attach(minilm.make(), "lora", gated=True), tmp_path)
    with pytest.raises(PetlError, match="transformers text encoders"):
        export_peft_lora(petlkit.attach(vit_case.make(), "lora"), tmp_path)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        import_peft_lora(minilm.make(), tmp_path / "absent")


def test_prompt_tuning_moves_both_ways(minilm, tmp_path):
    from petlkit.interop.peft import export_peft_prompt, import_peft_prompt

    ours = petlkit.attach(minilm.make(), "prompt", length=4, placement="before_embeddings").eval()
    export_peft_prompt(ours, tmp_path / "out")
    theirs = PeftModel.from_pretrained(minilm.make().encoder, tmp_path / "out").eval()
    mask = minilm.inputs["attention_mask"].unsqueeze(-1)
    expected = _hidden(ours.model.encoder, minilm.inputs) * mask
    assert ((_hidden(theirs, minilm.inputs)[:, 4:] * mask - expected).abs().max()) <= 1e-5
    theirs.save_pretrained(tmp_path / "back")
    again = import_peft_prompt(minilm.make(), tmp_path / "back").eval()
    torch.testing.assert_close(again(**minilm.inputs), ours(**minilm.inputs), rtol=0, atol=0)


@pytest.mark.parametrize("option", ["use_rslora", "use_dora"])
def test_peft_lora_variants_petlkit_lacks_are_refused_not_misread(minilm, tmp_path, option):
    """rsLoRA scales by alpha/sqrt(r) and DoRA adds a magnitude vector: read as plain LoRA they
    would load without error and compute something else."""
    peft = get_peft_model(minilm.make().encoder,
                          LoraConfig(r=2, target_modules=["query"], **{option: True}))  # fmt: skip
    peft.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=f"uses PEFT options petlkit's LoRA lacks: .*{option}"
    ):
        import_peft_lora(minilm.make(), tmp_path)


def test_a_peft_folder_of_another_kind_is_refused(minilm, tmp_path):
    from petlkit.interop.peft import export_peft_prompt, import_peft_prompt

    ours = petlkit.attach(minilm.make(), "prompt", length=2, placement="before_embeddings")
    export_peft_prompt(ours, tmp_path)
    with pytest.raises(CheckpointError, match="holds a PROMPT_TUNING adapter, not LORA"):
        import_peft_lora(minilm.make(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="adapter_config.json is not valid JSON"):
        import_peft_prompt(minilm.make(), tmp_path)


def test_prompts_peft_cannot_place_are_refused(minilm, tmp_path):
    from petlkit.interop.peft import export_peft_prompt

    after = petlkit.attach(minilm.make(), "prompt", length=2, placement="after_embeddings")
    with pytest.raises(CheckpointError, match="after the embedding layer; PEFT's PROMPT_TUNING"):
        export_peft_prompt(after, tmp_path)
    lora = petlkit.attach(minilm.make(), "lora", r=2)
    with pytest.raises(PetlError, match="is not ungated prompt tuning"):
        export_peft_prompt(lora, tmp_path)
