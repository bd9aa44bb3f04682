"""HF PEFT's LoRA folder format, both ways: `export_peft_lora` writes a folder that
`peft.PeftModel.from_pretrained(model, folder)` loads (for petlkit's text task models the bare
encoder; for a transformers model that model); `import_peft_lora` attaches a PEFT LoRA folder.
Neither imports peft: the format is two files (a JSON config and safetensors weights named
`base_model.model.<module>.lora_{A,B}.weight`). A LoRA over a fused projection (GPT-2's Conv1D
`c_attn`) is one pair over the whole output in PEFT (petlkit: `split_fused=False`); Conv1D
layers are marked `fan_in_fan_out`, as PEFT marks them (their weight is stored input × output)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from petlkit.errors import CheckpointError, PetlError
from petlkit.io import read_safetensors, write_json, write_safetensors
from petlkit.layout import layout_of
from petlkit.methods.base import innermost
from petlkit.methods.linears import is_conv1d
from petlkit.methods.lora import LoRA, LoRAConfig, LoRALinear
from petlkit.methods.prompt import Prompt, PromptConfig
from petlkit.model import PetlModel, attach

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _read_peft(folder: Path, peft_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT adapter folder holding a `peft_type` adapter."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {folder}; is it a PEFT adapter folder?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if config.get("peft_type") != peft_type:
        raise CheckpointError(
            f"{folder} holds a {config.get('peft_type')} adapter, not {peft_type}"
        )
    return config, read_safetensors(folder / WEIGHTS)


def _encoder_prefix(model: torch.nn.Module) -> str:
    encoder = layout_of(model).encoder
    if encoder is None:
        raise PetlError("PEFT interop covers transformers text encoders; this model has none")
    return f"{encoder}." if encoder else ""


def export_peft_lora(petl: PetlModel, folder: str | Path, name: str = "default") -> Path:
    """Write method `name` (a plain LoRA) as a PEFT LoRA folder for the bare encoder."""
    method = petl._get(name)
    if not isinstance(method, LoRA) or method.config.gated:
        raise PetlError(f"{name!r} is not a plain LoRA; PEFT's LoRA format holds only that")
    prefix = _encoder_prefix(petl.model)
    tensors, modules, conv1d = {}, [], set()
    for module, tuner in method.tuners(petl.model):
        if not isinstance(tuner, LoRALinear) or tuner.parts is not None:
            raise PetlError(
                f"{module} is a fused projection with a LoRA pair per part; PEFT's format holds "
                "one pair per layer: train with split_fused=False"
            )
        conv1d.add(is_conv1d(innermost(tuner)))
        if not module.startswith(prefix):
            raise PetlError(f"{module} is outside the encoder; PEFT's folder is for the encoder")
        inner = module.removeprefix(prefix)
        tensors[f"{PREFIX}{inner}.lora_A.weight"] = tuner.lora_A.detach()
        tensors[f"{PREFIX}{inner}.lora_B.weight"] = tuner.lora_B[0].detach()
        modules.append(inner.rsplit(".", 1)[-1])
    cfg = method.config
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS, tensors, {"format": "pt"})
    if len(conv1d) > 1:
        raise PetlError("PEFT marks a whole adapter fan_in_fan_out or not; this LoRA adapts "
                        "both Conv1D and Linear layers: export them as two adapters")  # fmt: skip
    task = "CAUSAL_LM" if layout_of(petl.model).causal and not prefix else "FEATURE_EXTRACTION"
    write_json(folder / CONFIG, {
        "peft_type": "LORA", "task_type": task, "r": cfg.r,
        "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(set(modules)),
        "bias": "none", "fan_in_fan_out": conv1d == {True}, "inference_mode": True,
        "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": None, "modules_to_save": None,
    })  # fmt: skip
    return folder


def import_peft_lora(
    model: torch.nn.Module, folder: str | Path, name: str = "default"
) -> PetlModel:
    """Attach the PEFT LoRA in `folder` to a petlkit text task model (or PetlModel)."""
    folder = Path(folder)
    config, tensors = _read_peft(folder, "LORA")
    unsupported = [k for k in ("use_rslora", "use_dora") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise CheckpointError(f"{folder} uses PEFT options petlkit's LoRA lacks: {unsupported}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{folder} was trained with PEFT bias={config['bias']!r}: it changed the model's "
            "biases too, which a petlkit LoRA does not hold (importing would drop them); "
            "retrain with bias='none', or train LoRA and BitFit together in petlkit"
        )
    task_model = model.model if isinstance(model, PetlModel) else model
    prefix = _encoder_prefix(task_model)
    targets = sorted({
        prefix + k.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        for k in tensors if k.endswith(".lora_A.weight")
    })  # fmt: skip
    if not targets:
        raise CheckpointError(f"{folder / WEIGHTS} has no lora_A weights")
    lora = LoRAConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout", 0.0)), targets=targets,
                      split_fused=False)  # fmt: skip
    petl = attach(model, lora, name=name)
    wrapped = [innermost(t) for _, t in petl.methods[name].tuners(petl.model)]
    if bool(config.get("fan_in_fan_out")) != any(is_conv1d(m) for m in wrapped):
        petl.remove_method(name)
        raise CheckpointError(
            f"{folder} says fan_in_fan_out={config.get('fan_in_fan_out')}, which does not match "
            "its target layers (only transformers' Conv1D stores weights input × output)"
        )
    with torch.no_grad():
        for module, tuner in petl.methods[name].tuners(petl.model):
            key = PREFIX + module.removeprefix(prefix)
            tuner.lora_A.copy_(tensors[f"{key}.lora_A.weight"])
            tuner.lora_B[0].copy_(tensors[f"{key}.lora_B.weight"])
    return petl


def export_peft_prompt(petl: PetlModel, folder: str | Path, name: str = "default") -> Path:
    """Write method `name` (ungated prompt tuning) as a PEFT PROMPT_TUNING folder."""
    method = petl._get(name)
    if method.config.placement != "before_embeddings" if isinstance(method, Prompt) else False:
        raise CheckpointError(
            f"{name!r} puts its prompts after the embedding layer; PEFT's PROMPT_TUNING puts "
            "them in front of the word embeddings: train with placement='before_embeddings'"
        )
    if not isinstance(method, Prompt) or method.config.gated:
        raise PetlError(
            f"{name!r} is not ungated prompt tuning; PEFT's PROMPT_TUNING holds only that"
        )
    layout = layout_of(petl.model)
    _encoder_prefix(petl.model)
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS, {"prompt_embeddings": method.prompt.detach()})
    write_json(folder / CONFIG, {
        "peft_type": "PROMPT_TUNING", "task_type": "FEATURE_EXTRACTION",
        "num_virtual_tokens": method.config.length, "token_dim": layout.width,
        "num_transformer_submodules": 1, "num_attention_heads": layout.num_heads,
        "num_layers": layout.depth, "prompt_tuning_init": "RANDOM", "inference_mode": True,
        "base_model_name_or_path": None,
    })  # fmt: skip
    return folder


def import_peft_prompt(
    model: torch.nn.Module, folder: str | Path, name: str = "default"
) -> PetlModel:
    """Attach the PEFT PROMPT_TUNING adapter in `folder` to a petlkit text task model."""
    folder = Path(folder)
    _, tensors = _read_peft(folder, "PROMPT_TUNING")
    prompts = tensors.get("prompt_embeddings")
    if prompts is None:
        raise CheckpointError(f"{folder / WEIGHTS} has no prompt_embeddings")
    config = PromptConfig(length=prompts.shape[0], placement="before_embeddings")  # PEFT's place
    petl = attach(model, config, name=name)
    with torch.no_grad():
        petl.methods[name].prompt.copy_(prompts)
    return petl
