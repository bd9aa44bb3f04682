"""Prompt tokens, one API over every supported backbone (the second extension point of
extensions.py): tokens inserted into the sequence before the first block, optionally replaced before
every later block (VPT-deep, petlkit's ViT only), and removed again before the final norm and head,
so the task model's output keeps its shape.

On petlkit's ViT through its `token_hooks`; on transformers models through forward hooks on the
module that embeds the input (`inputs_embeds` and an extended attention mask). On a decoder the
prompts go in front of the text on the first forward (positions 0..p−1, text from p); when that
forward filled a KV cache, later forwards with that cache (generation steps) add no prompts again
but shift positions and the attention mask by p.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from petlkit.backbones.extensions import Handle
from petlkit.errors import PetlError
from petlkit.layout import BackboneLayout
from petlkit.methods.targeting import get_module

TokenMaker = Callable[[torch.Tensor], torch.Tensor | None]
BlockTokenMaker = Callable[[int, torch.Tensor], torch.Tensor | None]

_CACHED_PROMPTS = "_petlkit_prompt_tokens"  # on a KV cache: prompt tokens it holds in front
PROMPT_PLACEMENTS = ("after_embeddings", "before_embeddings")


def add_prompt_tokens(
    model: nn.Module,
    layout: BackboneLayout,
    make: TokenMaker,
    per_block: BlockTokenMaker | None = None,
    placement: str = "after_embeddings",
    count: Callable[[], int] | None = None,
) -> Handle:
    """Insert `make(x)` ((batch, p, width), or None for nothing) into the sequence before the
    first block; `per_block(i, tokens)` replaces them before block i ≥ 1 (ViT only).

    placement 'after_embeddings' (the spec's): on a ViT after the class token, once the position
    embedding is added; on text in front of the embedding layer's output (x = that output), so
    the prompts get no position or token-type embedding and real tokens keep positions 0..n−1.
    'before_embeddings' (text only; Lester et al. and HF PEFT): in front of the word embeddings
    (x = those), so the encoder adds position embeddings to the prompts and shifts the real
    tokens by p. `count()` is how many tokens `make` will give (0 when off)."""
    if layout.encoder is None:
        if placement != "after_embeddings":
            raise PetlError(
                "on a ViT prompts go after the class token, once position embeddings are added "
                "(they have no position of their own): use placement='after_embeddings'"
            )
        return _vit_prompts(model, make, per_block)
    if per_block is not None:
        raise PetlError("per-block (deep) prompts need the project ViT; for text use prefix tuning")
    inputs = layout.encoder if layout.inputs is None else layout.inputs
    encoder = get_module(model, inputs) if inputs else model
    if placement == "before_embeddings" or layout.rotary or not _has_embedding_layer(encoder):
        return _text_prompts_before(encoder, make)  # see _has_embedding_layer
    if count is None:
        raise PetlError("after_embeddings prompts on text need `count` to extend the mask")
    return _text_prompts_after(encoder, make, count)


def _has_embedding_layer(encoder: nn.Module) -> bool:
    """True where an `embeddings` layer (words + positions) sits between the ids and the blocks
    and reads no attention mask (DeBERTa's does). Elsewhere (decoders, rotary models, whose
    positions are counted from the input) prompts go in front of the word embeddings: on rotary
    models that is after every embedding layer anyway."""
    layer = getattr(encoder, "embeddings", None)
    if not isinstance(layer, nn.Module) or layer is encoder.get_input_embeddings():
        return False
    return "mask" not in inspect.signature(layer.forward).parameters


def _vit_prompts(model: nn.Module, make: TokenMaker, per_block: BlockTokenMaker | None) -> Handle:
    hooks = getattr(model, "token_hooks", None)
    if hooks is None:
        raise PetlError(f"{type(model).__name__} has no `token_hooks` to insert prompt tokens")
    inserted = [0]
    k = getattr(model, "num_prefix_tokens", 1)  # class and register tokens stay in front

    def embed(x: torch.Tensor) -> torch.Tensor:
        tokens = make(x)
        inserted[0] = 0 if tokens is None else tokens.shape[1]
        if tokens is None:
            return x
        front, rest = x.split([k, x.shape[1] - k], dim=1)
        return torch.cat([front, tokens.to(x.dtype), rest], dim=1)

    # split, not slices: a split's backward is one concatenation of the pieces' gradients, where
    # each slice's would be a zero-filled copy of the whole sequence and an add to join them
    def replace(index: int, x: torch.Tensor) -> torch.Tensor:
        n = inserted[0]
        tokens = per_block(index, x) if n else None
        if tokens is None:
            return x
        front, _, rest = x.split([k, n, x.shape[1] - k - n], dim=1)
        return torch.cat([front, tokens.to(x.dtype), rest], dim=1)

    def final(x: torch.Tensor) -> torch.Tensor:  # prompts out before norm and pooling
        n = inserted[0]
        if not n:
            return x
        front, _, rest = x.split([k, n, x.shape[1] - k - n], dim=1)
        return torch.cat([front, rest], dim=1)

    wanted = {"embed": embed, "final": final}
    if per_block is not None:
        depth = len(model.blocks)
        wanted.update({f"block.{i}": (lambda x, i=i: replace(i, x)) for i in range(1, depth)})
    taken = sorted(set(wanted) & set(hooks))
    if taken:
        raise PetlError(f"token hook points {taken} are used by another method already")
    hooks.update(wanted)
    return Handle(lambda: [hooks.pop(key, None) for key in wanted])


def _claim_prompts(encoder: nn.Module) -> None:
    if getattr(encoder, "_petlkit_prompts", False):
        raise PetlError("this encoder gets prompt tokens from another method already")


def _drop_prompt_outputs(inserted: list[int]) -> Callable:
    def after(module: nn.Module, args: tuple, kwargs: dict, output):
        n = inserted[0]
        if n:
            output.last_hidden_state = output.last_hidden_state[:, n:]
            cache = _output_cache(output)  # it now holds the prompts
            if cache is not None and not _cached_prompts(cache):
                cache.__dict__[_CACHED_PROMPTS] = n
        return output

    return after


def _text_prompts_after(encoder: nn.Module, make: TokenMaker, count: Callable[[], int]) -> Handle:
    _claim_prompts(encoder)
    inserted = [0]

    def extend_mask(module: nn.Module, args: tuple, kwargs: dict):
        inserted[0] = count()
        mask = kwargs.get("attention_mask")
        if not inserted[0] or mask is None:
            return None
        kwargs = dict(kwargs)
        _pad_front(kwargs, inserted[0], mask.shape[0], (("attention_mask", 1),))
        return args, kwargs

    def prepend(module: nn.Module, args: tuple, kwargs: dict, embedded: torch.Tensor):
        if not inserted[0]:
            return None
        tokens = make(embedded)
        if tokens is None or tokens.shape[1] != inserted[0]:
            raise PetlError(f"the prompt maker gave {tokens and tokens.shape[1]} tokens, not "
                            f"the {inserted[0]} announced")  # fmt: skip
        return torch.cat([tokens.to(embedded.dtype), embedded], dim=1)

    embeddings = encoder.get_input_embeddings()
    embedding_layer = getattr(encoder, "embeddings", None)
    if embedding_layer is None or embedding_layer is embeddings:
        raise PetlError(f"{type(encoder).__name__} has no `embeddings` layer to put prompts after")
    handles = [
        encoder.register_forward_pre_hook(extend_mask, with_kwargs=True),
        embedding_layer.register_forward_hook(prepend, with_kwargs=True),
        encoder.register_forward_hook(_drop_prompt_outputs(inserted), with_kwargs=True),
    ]
    return _release_prompts(encoder, handles)


def _release_prompts(encoder: nn.Module, handles: list) -> Handle:
    encoder.__dict__["_petlkit_prompts"] = True

    def undo() -> None:
        for handle in handles:
            handle.remove()
        encoder.__dict__.pop("_petlkit_prompts", None)

    return Handle(undo)


def _output_cache(output: object) -> object:
    """The KV cache a forward returned (`cache`; `past_key_values` before transformers 5.2x),
    read as dict entries so the deprecated name warns no one."""
    get = getattr(output, "get", None)
    if get is None:
        return None
    return get("cache") if get("cache") is not None else get("past_key_values")


def _cached_prompts(cache: object) -> int:
    """Prompt tokens a KV cache already holds in front (0: none, or no cache)."""
    return 0 if cache is None else cache.__dict__.get(_CACHED_PROMPTS, 0)


def _cache_length(cache: object) -> int:
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if get is not None else 0


def _pad_front(kwargs: dict, n: int, batch: int, keys: tuple[tuple[str, int], ...]) -> None:
    for key, fill in keys:
        value = kwargs.get(key)
        if value is not None and value.dim() == 2:
            pad = torch.full((batch, n), fill, dtype=value.dtype, device=value.device)
            kwargs[key] = torch.cat([pad, value], dim=1)


def _text_prompts_before(encoder: nn.Module, make: TokenMaker) -> Handle:
    _claim_prompts(encoder)
    inserted = [0]

    def before(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if "Static" in type(cache).__name__:
            raise PetlError(
                "prompt tokens lengthen the sequence past what a static KV cache was sized and "
                "masked for; generate with the default (dynamic) cache"
            )
        held = _cached_prompts(cache)
        if held and _cache_length(cache):  # a later step: the cache holds the prompts already
            inserted[0] = 0
            batch = next(
                kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None
            ).shape[0]
            _pad_front(kwargs, held, batch, (("attention_mask", 1),))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + held
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        tokens = make(embeds)
        inserted[0] = 0 if tokens is None else tokens.shape[1]
        if tokens is None:
            return None
        batch, n = tokens.shape[:2]
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([tokens.to(embeds.dtype), embeds], dim=1)
        _pad_front(kwargs, n, batch, (("attention_mask", 1), ("token_type_ids", 0)))
        positions = kwargs.get("position_ids")
        if positions is not None:  # prompts at 0..n−1, the text after them
            front = torch.arange(n, dtype=positions.dtype, device=positions.device)
            front = front.expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([front, positions + n], dim=-1)
        return args, kwargs

    handles = [
        encoder.register_forward_pre_hook(before, with_kwargs=True),
        encoder.register_forward_hook(_drop_prompt_outputs(inserted), with_kwargs=True),
    ]
    return _release_prompts(encoder, handles)
