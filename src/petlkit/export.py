"""A merged model as a plain transformers folder: `AutoModelFor...from_pretrained` loads it
without petlkit, and it gives the merged model's outputs.

Merging a shift (SaS, SSF, BitFit's added offsets) into a linear that had no bias gives it one.
A transformers config declares biases per group of linears (LLaMA's `attention_bias` for q, k,
v, o and `mlp_bias` for the MLP), so each flag whose group gained a bias is switched on and the
group's other linears get zero biases. Before the folder is kept, it is loaded back and its
outputs are compared with the merged model's; a family whose config cannot declare the biases
is refused there, with the folder removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from petlkit.errors import NotMergeableError, PetlError
from petlkit.model import PetlModel

BIAS_FLAGS = ("attention_bias", "mlp_bias")  # transformers config flags that add bias groups


def save_merged_pretrained(petl: PetlModel, folder: str | Path, tokenizer=None) -> Path:
    """Merge `petl` (if it is not yet) and write its model as a transformers folder."""
    model = petl.model
    if not hasattr(model, "save_pretrained"):
        raise PetlError(f"{type(model).__name__} is not a transformers model; a merged petlkit "
                        "backbone is written by `petlkit merge` as its own files")  # fmt: skip
    if not all(m.merged for m in petl.methods.values()):
        petl.merge()  # refuses non-mergeable methods with the reason
    _declare_biases(model)
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    _check_reload(model, partial)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def _declare_biases(model: nn.Module) -> None:
    config = model.config
    for flag in (f for f in BIAS_FLAGS if getattr(config, f, None) is False):
        flagged = config.__class__.from_dict({**config.to_dict(), flag: True})
        group = _biased(type(model), flagged) - _biased(type(model), config)
        if not any(model.get_submodule(name).bias is not None for name in group):
            continue
        for name in group:
            linear = model.get_submodule(name)
            if linear.bias is None:
                weight = linear.weight
                linear.bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)
        setattr(config, flag, True)


def _biased(model_class, config) -> set[str]:
    """The modules with a bias in a model of `model_class` built from `config` (on meta)."""
    with torch.device("meta"):
        shape = model_class(config)
    return {n.removesuffix(".bias") for n, _ in shape.named_parameters() if n.endswith(".bias")}


@torch.no_grad()
def _check_reload(model: nn.Module, folder: Path) -> None:
    device = next(model.parameters()).device
    reloaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype).to(device)
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.arange(3, 3 + 12, device=device).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    reloaded.eval()
    try:
        ours, theirs = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    finally:
        model.train(was_training)
    if not torch.allclose(ours.float(), theirs.float(), atol=1e-4, rtol=1e-3):
        shutil.rmtree(folder, ignore_errors=True)
        raise NotMergeableError(
            f"{type(model).__name__}'s config cannot declare the biases the merge added (its "
            "linears had none), so a saved folder would not reload as merged; keep the adapter "
            "(petlkit.save_adapter) and merge after loading"
        )
