"""Prefix values started from real tokens (Li & Liang 2021, §7.4: a prefix initialised with the
activations of real words trains better than a random one, most with little data).

The model reads the given token ids (repeated to the prefix length and cut to it) once, with
nothing added, and every block's key and value projections' outputs become that block's prefix
keys and values. Keys are taken before any rotary position, as the prefix keys carry none
(backbones/extensions.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from petlkit.errors import PetlError
from petlkit.layout import BackboneLayout, BlockLayout, word_embeddings
from petlkit.methods.lora import qkv_segments


def token_key_values(
    model: nn.Module, layout: BackboneLayout, tokens: tuple[int, ...], length: int
) -> torch.Tensor:
    """(length, depth·2·kv heads·head_dim), float32 on the CPU (placed and cast later with the
    method's other tensors): per token, block by block, its keys then its values, the flat
    layout of Prefix.values()."""
    weight = getattr(word_embeddings(model, layout.inputs), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PetlError(
            f"prefix init='tokens' runs the model on token ids, and {type(model).__name__} has "
            "no word-embedding table (a transformers text model's get_input_embeddings()); use "
            "init='random'"
        )
    if weight.is_meta:
        raise PetlError(
            "prefix init='tokens' runs the model on token ids, and its weights are on the meta "
            "device (no values yet); load them before attaching, or use init='random'"
        )
    ids = torch.tensor(tokens)
    if int(ids.max()) >= weight.shape[0]:
        raise PetlError(f"prefix init_tokens {sorted(set(tokens))} reach past the model's "
                        f"{weight.shape[0]} word embeddings; tokenize with the model's own "
                        "tokenizer")  # fmt: skip
    ids = ids.repeat(math.ceil(length / len(ids)))[:length].unsqueeze(0).to(weight.device)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            outputs[name] = output[0].detach().to("cpu", torch.float32)

        return hook

    names = {name for block in layout.blocks for name in _key_value_modules(layout, block)}
    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    inputs, kwargs = model.get_submodule(layout.inputs), {"input_ids": ids}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        inputs, kwargs["decoder_input_ids"] = model, ids  # the same tokens through both stacks
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs(**kwargs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    missing = sorted(names - set(outputs))
    if missing:
        raise PetlError(
            f"prefix init='tokens': running {type(inputs).__name__} on the tokens did not reach "
            f"{missing[:3]}; use init='random' for this model"
        )
    return torch.cat([_keys_and_values(layout, block, outputs) for block in layout.blocks], -1)


def _key_value_modules(layout: BackboneLayout, block: BlockLayout) -> tuple[str, ...]:
    """The block's fused q|k|v linear, or its key linear and its value linear."""
    if block.query in layout.fused_qkv:
        return (block.query,)
    keys = [n for n in block.attn_linears if n not in (block.query, block.value)]
    if len(keys) != 1:
        raise PetlError(
            f"prefix init='tokens' needs the key projection of {block.attention}, and its layout "
            f"names {len(keys)} linears besides the query and the value; declare key= in the "
            "ModelLayout, or use init='random'"
        )
    return keys[0], block.value


def _keys_and_values(layout: BackboneLayout, block: BlockLayout, outputs: dict) -> torch.Tensor:
    """(length, 2·kv heads·head_dim): the block's keys, then its values."""
    if block.query not in layout.fused_qkv:
        key, value = _key_value_modules(layout, block)
        return torch.cat([outputs[key], outputs[value]], -1)
    fused, parts, start = outputs[block.query], {1: [], 2: []}, 0
    for part, _, rows in qkv_segments(layout):
        if part in parts:
            parts[part].append(fused[:, start : start + rows])
        start += rows
    return torch.cat(parts[1] + parts[2], -1)
