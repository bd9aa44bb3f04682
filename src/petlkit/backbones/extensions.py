"""The two extension points token-level methods need, one API over every supported backbone.

- `add_extra_kv` (here): extra key/value tokens prepended in one block's self-attention (prefix
  tuning).
- `add_prompt_tokens` (prompt_tokens.py): tokens inserted into the sequence before the first
  block, optionally replaced before every later block (VPT-deep), and removed again before the
  final norm and head, so the task model's output keeps its shape.

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

import sys
from collections.abc import Callable

import torch
from torch import nn

from petlkit.errors import PetlError
from petlkit.layout import BackboneLayout
from petlkit.methods.targeting import get_module

KVProvider = Callable[[torch.Tensor], tuple[torch.Tensor, ...] | None]

_PREFIX = "petlkit_"
_PROVIDER = "_petlkit_kv_provider"
_PENDING = "_petlkit_kv"


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
    _acquire_prefix_attention(encoder, attention)
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


def _uses_attention_interface(encoder: nn.Module, attention: nn.Module) -> bool:
    """True where the model's attention goes through transformers' AttentionInterface: models
    that declare it, and those whose attention code calls it without declaring it (T5, BART)."""
    if getattr(encoder, "_supports_attention_backend", False):
        return True
    code = sys.modules.get(type(attention).__module__)
    return getattr(code, "ALL_ATTENTION_FUNCTIONS", None) is not None


def _acquire_prefix_attention(encoder: nn.Module, attention: nn.Module) -> None:
    current = encoder.config._attn_implementation
    if current.startswith(_PREFIX):  # already wrapped (the wrapper alone changes nothing)
        return
    if not _uses_attention_interface(encoder, attention):
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
            bias = kwargs.get("position_bias")
            if bias is not None:  # T5's relative positions: none for the prefix keys
                kwargs["position_bias"] = torch.cat(
                    [bias.new_zeros(*bias.shape[:-1], prefix), bias], -1
                )
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
    """(1, 1, queries, keys) boolean: query i sees keys 0..i, the mask sdpa's own `is_causal`
    stands for (top-left). transformers gives no mask only where that is right: queries that
    start at key 0 (keys past the queries are then empty slots of a static cache)."""
    rows = torch.arange(queries, device=device).unsqueeze(1)
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
