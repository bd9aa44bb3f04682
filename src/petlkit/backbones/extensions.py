"""The two extension points token-level methods need, one API over every supported backbone.

- `add_extra_kv`: extra key/value tokens prepended in one block's self-attention (prefix tuning).
- `add_prompt_tokens`: tokens inserted into the sequence before the first block, optionally replaced
  before every later block (VPT-deep), and removed again before the final norm and head, so the task
  model's output keeps its shape.

On the project ViT both are its declared hook points (`Attention.extra_kv`, `token_hooks`). On
transformers encoders nothing is patched: extra key/value tokens go through transformers' public
`AttentionInterface` (an attention function registered under `petlkit_<original>` that wraps the
encoder's own sdpa or eager attention; a forward pre-hook on each attention module computes the
tokens from its input), and prompts go through forward hooks on the module that embeds the input
(`inputs_embeds` and an extended attention mask). This relies on the transformers 5.x attention
interface, which is why pyproject pins `transformers>=5,<6`.

Decoders: extra key/value tokens are joined to the keys and values the attention function is given,
after any KV cache has been read and written, so they are never stored in the cache; their keys get
no rotary position; a causal mask is extended so every query sees them. Prompt tokens go in front of
the text on the first forward (positions 0..p−1, text from p); when that forward filled a KV cache,
later forwards with that cache (generation steps) add no prompts again but shift positions and the
attention mask by p.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

from petlkit.errors import PetlError
from petlkit.layout import BackboneLayout
from petlkit.methods.targeting import get_module

KVProvider = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]
TokenMaker = Callable[[torch.Tensor], torch.Tensor | None]
BlockTokenMaker = Callable[[int, torch.Tensor], torch.Tensor | None]

_PREFIX = "petlkit_"
_PROVIDER = "_petlkit_kv_provider"
_PENDING = "_petlkit_kv"
_CACHED_PROMPTS = "_petlkit_prompt_tokens"  # on a KV cache: prompt tokens it holds in front


class Handle:
    """Undoes an injection: `remove()` runs the undo steps in reverse order, once."""

    def __init__(self, *undo: Callable[[], None]) -> None:
        self._undo = list(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _encoder(model: nn.Module, layout: BackboneLayout) -> nn.Module:
    return get_module(model, layout.encoder) if layout.encoder else model


# -- extra key/value tokens -------------------------------------------------------------------
def add_extra_kv(
    model: nn.Module, layout: BackboneLayout, index: int, provider: KVProvider
) -> Handle:
    """Prepend `provider(attention input)` (each (batch, heads, p, head_dim)) to block `index`'s
    keys and values; padding stays masked, the extra tokens are always attended."""
    name = layout.blocks[index].attention
    attention = get_module(model, name)
    if layout.encoder is None:
        if not hasattr(attention, "extra_kv"):
            raise PetlError(f"{name} ({type(attention).__name__}) has no `extra_kv` hook point")
        if attention.extra_kv is not None:
            raise PetlError(f"{name} already gets extra key/value tokens from another method")
        attention.extra_kv = provider
        return Handle(lambda: setattr(attention, "extra_kv", None))
    if getattr(attention, _PROVIDER, None) is not None:
        raise PetlError(f"{name} already gets extra key/value tokens from another method")
    encoder = _encoder(model, layout)
    _acquire_prefix_attention(encoder)
    attention.__dict__[_PROVIDER] = provider  # a plain attribute: not a submodule
    hook = attention.register_forward_pre_hook(_compute_kv, with_kwargs=True)

    def undo() -> None:
        hook.remove()
        attention.__dict__.pop(_PROVIDER, None)
        attention.__dict__.pop(_PENDING, None)
        _release_prefix_attention(encoder)

    return Handle(undo)


def _compute_kv(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    module.__dict__[_PENDING] = module.__dict__[_PROVIDER](hidden)


def _acquire_prefix_attention(encoder: nn.Module) -> None:
    current = encoder.config._attn_implementation
    if current.startswith(_PREFIX):  # already wrapped (the wrapper alone changes nothing)
        return
    if not getattr(encoder, "_supports_attention_backend", False):
        raise PetlError(
            f"{type(encoder).__name__} computes attention inside its own forward, not through "
            "transformers' AttentionInterface, so prefix tuning cannot add key/value tokens to it; "
            "use LoRA, adapters, SaS or prompt tuning on this model"
        )
    name = _register_prefix_attention(current)
    encoder.set_attn_implementation(name)
    if encoder.config._attn_implementation != name:
        raise PetlError(f"{type(encoder).__name__} refused the attention implementation {name}")


def _release_prefix_attention(encoder: nn.Module) -> None:
    """Back to the encoder's own attention once no module of it gets extra tokens."""
    current = encoder.config._attn_implementation
    in_use = any(_PROVIDER in m.__dict__ for m in encoder.modules())
    if current.startswith(_PREFIX) and not in_use:
        encoder.set_attn_implementation(current.removeprefix(_PREFIX))


def _register_prefix_attention(inner: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if inner not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise PetlError(f"cannot add prefix tokens to the {inner!r} attention implementation")

    def attention(module, query, key, value, attention_mask, **kwargs):
        extra = module.__dict__.pop(_PENDING, None)
        if extra is not None:
            if attention_mask is None and _implicitly_causal(module, inner, query, kwargs):
                attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
            own, prefix = key.shape[2], extra[0].shape[2]
            key = torch.cat([extra[0].to(key.dtype), key], dim=2)
            value = torch.cat([extra[1].to(value.dtype), value], dim=2)
            if len(extra) == 3:  # a per-query log-gate on the prefix logits (methods/prefix.py)
                attention_mask = _gated_mask(attention_mask, extra[2], prefix, own, query)
            else:
                attention_mask = _extend_mask(attention_mask, prefix)
        return _inner_attention(module, inner)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _inner_attention(module: nn.Module, inner: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[inner]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise PetlError(f"{type(module).__name__} has no {inner!r} attention function to wrap")
    return eager


def _implicitly_causal(module: nn.Module, inner: str, query: torch.Tensor, kwargs: dict) -> bool:
    """True where sdpa would apply its own causal mask (no mask given): that mask would hide
    the extra tokens (sdpa's causal alignment is top-left), so an explicit one is built."""
    if inner != "sdpa" or query.shape[2] == 1:
        return False
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


def _causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(1, 1, queries, keys) boolean: query i sees keys up to its own position, the queries
    being the last `queries` positions (after a KV cache)."""
    rows = torch.arange(queries, device=device).unsqueeze(1) + (keys - queries)
    return (torch.arange(keys, device=device).unsqueeze(0) <= rows).view(1, 1, queries, keys)


def _gated_mask(
    mask: torch.Tensor | None, log_gate: torch.Tensor, prefix: int, own: int, query: torch.Tensor
) -> torch.Tensor:
    """An additive (batch, 1, queries, prefix + own) mask in the query's dtype: log_gate
    (batch, 1, queries, 1) on the prefix keys in front, the given mask (boolean, additive or
    none) on the model's own keys after them."""
    batch, _, queries, _ = query.shape
    if mask is None:
        rest = query.new_zeros(1, 1, queries, own)
    elif mask.dtype == torch.bool:
        rest = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device)
        rest = rest.masked_fill(~mask, torch.finfo(query.dtype).min)
    else:
        rest = mask.to(query.dtype)
    front = log_gate.to(query.dtype).expand(batch, 1, queries, prefix)
    return torch.cat([front, rest.expand(batch, *rest.shape[1:])], dim=-1)


def _extend_mask(mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """Prepend `extra` always-visible key positions to a 4-D mask (boolean or additive)."""
    if mask is None:
        return None
    visible = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], extra), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


# -- prompt tokens ----------------------------------------------------------------------------
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
        return torch.cat([x[:, :k], tokens.to(x.dtype), x[:, k:]], dim=1)

    def replace(index: int, x: torch.Tensor) -> torch.Tensor:
        n = inserted[0]
        tokens = per_block(index, x) if n else None
        if tokens is None:
            return x
        return torch.cat([x[:, :k], tokens.to(x.dtype), x[:, k + n :]], dim=1)

    def final(x: torch.Tensor) -> torch.Tensor:  # prompts out before norm and pooling
        n = inserted[0]
        return torch.cat([x[:, :k], x[:, k + n :]], dim=1) if n else x

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
            cache = getattr(output, "past_key_values", None)  # it now holds the prompts
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
        pad = torch.ones((mask.shape[0], inserted[0]), dtype=mask.dtype, device=mask.device)
        return args, dict(kwargs, attention_mask=torch.cat([pad, mask], dim=1))

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
