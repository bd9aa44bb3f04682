"""PEFT's LoRA folders both ways on transformers decoders (Llama, Qwen2, GPT-2): a folder PEFT
wrote loads here and a folder written here loads in PEFT, with identical outputs. GPT-2's fused
Conv1D `c_attn` is one LoRA pair over the whole output in PEFT, marked fan_in_fan_out."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import petlkit
from petlkit.errors import CheckpointError, PetlError
from petlkit.interop.peft import export_peft_lora, import_peft_lora
from tests.families import BY_NAME

TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "k_proj", "o_proj"],
           "gpt2": ["c_attn"]}  # fmt: skip


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**BY_NAME[family].inputs()).logits


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_a_peft_folder_loads_with_identical_outputs(family, tmp_path):
    torch.manual_seed(7)
    config = LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[family],
                        fan_in_fan_out=family == "gpt2")  # fmt: skip
    peft = get_peft_model(BY_NAME[family].make(), config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft.save_pretrained(tmp_path)
    ours = import_peft_lora(BY_NAME[family].make(), tmp_path).eval()
    expected = logits(peft.eval(), family)
    assert (expected - logits(BY_NAME[family].make(), family)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, family), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_a_folder_written_here_loads_in_peft(family, tmp_path):
    ours = petlkit.attach(BY_NAME[family].make(), "lora", r=2, alpha=4,
                          targets=TARGETS[family], split_fused=False)  # fmt: skip
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    export_peft_lora(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2")  # as PEFT writes Conv1D adapters
    assert config["task_type"] == "CAUSAL_LM"
    theirs = PeftModel.from_pretrained(BY_NAME[family].make(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, family), logits(ours.eval(), family),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_a_per_part_lora_on_a_fused_projection_is_not_exported(tmp_path):
    ours = petlkit.attach(BY_NAME["gpt2"].make(), "lora", r=2)  # q and v pairs inside c_attn
    with pytest.raises(PetlError, match="split_fused=False"):
        export_peft_lora(ours, tmp_path)


def test_a_folder_whose_fan_in_fan_out_contradicts_its_layers_is_refused(tmp_path):
    peft = get_peft_model(BY_NAME["llama"].make(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"fan_in_fan_out": false',
                                                 '"fan_in_fan_out": true'))  # fmt: skip
    model = BY_NAME["llama"].make()
    with pytest.raises(CheckpointError, match="fan_in_fan_out"):
        import_peft_lora(model, tmp_path)
    assert not any("lora" in n for n, _ in model.named_parameters())
