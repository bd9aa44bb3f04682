"""Adapter-only checkpoints: `adapter_config.json` + `adapter_model.safetensors`.

Only what a method trained (and the task head) is stored; the backbone comes from its own source.
Loading checks the checkpoint was made for a backbone of the same shape and fails clearly if not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlkit import __version__
from petlkit.errors import CheckpointError, PetlError
from petlkit.families import ModelLayout
from petlkit.io import read_safetensors, write_json, write_safetensors
from petlkit.layout import head_names
from petlkit.methods.base import backbone_parameters
from petlkit.model import PetlModel, attach
from petlkit.registry import config_from_dict

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def backbone_fingerprint(model: nn.Module, heads: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What identifies a backbone's shape: class, parameter count and a hash of names/shapes."""
    params = backbone_parameters(model, heads)
    lines = "\n".join(f"{n}:{tuple(p.shape)}" for n, p in sorted(params.items()))
    return {
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in params.values()),
        "shapes_sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }


def task_model_info(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the task model around the backbone: its class, its outputs, its pooling
    (text) or its input (ViT). Recorded in the adapter; `load_adapter` checks it."""
    heads = head_names(model)
    linears = [
        m for h in heads for m in model.get_submodule(h).modules() if hasattr(m, "out_features")
    ]
    info: dict[str, Any] = {
        "class": type(model).__name__,
        "outputs": linears[-1].out_features if linears else None,
    }
    if heads != ("head",):
        info["heads"] = list(heads)
    if hasattr(model, "pooling"):
        info["pooling"] = model.pooling
    cfg = getattr(model, "cfg", None)
    for key in ("img_size", "patch_size", "in_chans"):
        if hasattr(cfg, key):
            info[key] = getattr(cfg, key)
    return info


def _check_task_model(folder: str | Path, saved: dict[str, Any], model: nn.Module) -> None:
    found = task_model_info(model)
    for key, want in saved.items():
        if key in ("labels", "heads") or key not in found or found[key] == want:
            continue
        hint = {
            "pooling": f"build it with pooling={want!r} (petlkit.build_model(..., "
            f"pooling={want!r}); `petlkit train` pools 'mean' unless told)",
            "outputs": f"build it with num_classes={want}",
        }.get(key, f"build it with {key}={want!r}")
        raise CheckpointError(
            f"{folder} was trained with {key}={want!r}, but this {found['class']} has "
            f"{key}={found[key]!r}: its predictions would be wrong; {hint}"
        )


def _state_to_save(petl: PetlModel, name: str, compact: bool = False):
    """(method config, tensors) an adapter file holds: the method's part and the head."""
    method = petl.methods[name]
    if compact:
        config, state = method.export(petl.model)
    else:
        config, state = method.config, dict(method.trainable(petl.model))
    state.update(petl.head_parameters())
    return config, state


def save_adapter(
    petl: PetlModel,
    folder: str | Path,
    name: str = "default",
    *,
    compact: bool = True,
    labels: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Write method `name`'s trained parameters and the head to `folder` (atomically per file).

    compact: store what inference needs (prefix values, not the MLP that produced them while
    training); False keeps every trained tensor, to continue training from the file.
    labels: the label each class id stands for (`task.label_names`), recorded under
    `task_model.labels` in adapter_config.json so predictions map back to the data's labels.
    """
    method = petl._get(name)
    if method.merged:
        raise PetlError("the model is merged: call unmerge() before saving the adapter")
    folder = Path(folder)
    fingerprint = backbone_fingerprint(petl.model)  # names and shapes: the same enabled or not
    method_config, state = _state_to_save(petl, name, compact)
    config = {
        "format_version": FORMAT_VERSION,
        "library": "petlkit",
        "library_version": __version__,
        "method": method_config.to_dict(),
        "backbone": fingerprint,
        "task_model": task_model_info(petl.model),
    }
    if labels is not None:
        config["task_model"]["labels"] = list(labels)
    write_safetensors(folder / WEIGHTS_FILE, state, {"format": "pt"})
    write_json(folder / CONFIG_FILE, config)
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}; is it a petlkit adapter folder?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    for key in ("format_version", "method", "backbone"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the key {key!r}; the file is incomplete")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {config['format_version']}, newer than this petlkit "
            f"reads ({FORMAT_VERSION}); upgrade petlkit"
        )
    return config


def load_adapter(
    model: nn.Module, folder: str | Path, name: str = "default", layout: ModelLayout | None = None
) -> PetlModel:
    """Attach the method saved in `folder` to `model` (task model or PetlModel) and load it;
    `layout`: the ModelLayout the adapter was trained with, for a model petlkit does not know."""
    config = read_adapter_config(folder)
    task_model = model.model if isinstance(model, PetlModel) else model
    saved_heads = config.get("task_model", {}).get("heads")
    heads = None if isinstance(model, PetlModel) or saved_heads is None else tuple(saved_heads)
    found = backbone_fingerprint(task_model, heads)
    want = config["backbone"]
    if found["shapes_sha256"] != want.get("shapes_sha256"):
        raise CheckpointError(
            f"{folder} was saved for a {want.get('class')} backbone with "
            f"{want.get('num_parameters'):,} parameters, but this is a {found['class']} with "
            f"{found['num_parameters']:,}; load it into the backbone it was trained on"
        )
    if "task_model" in config:  # (adapters from before format 1.1 lack it)
        _check_task_model(folder, config["task_model"], task_model)
    tensors = read_safetensors(Path(folder) / WEIGHTS_FILE)
    extra = {} if isinstance(model, PetlModel) else {"heads": heads, "layout": layout}
    petl = attach(model, config_from_dict(config["method"]), name=name, **extra)
    _, expected = _state_to_save(petl, name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        petl.remove_method(name)
        raise CheckpointError(
            f"{folder} does not match its own config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; the weights file belongs to another adapter"
        )
    for key, param in expected.items():  # every check before the first copy: a refused file
        if param.shape != tensors[key].shape:  # leaves the model as it was
            petl.remove_method(name)
            hint = ("was the head built for another number of classes?"
                    if key.startswith("head.") else
                    "the weights file belongs to another adapter or was edited")  # fmt: skip
            raise CheckpointError(
                f"{key}: saved shape {tuple(tensors[key].shape)} != model "
                f"{tuple(param.shape)}; {hint}"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return petl
