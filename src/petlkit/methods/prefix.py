"""Prefix tuning (Li & Liang, 2021): p learned key and value vectors prepended in every block's
self-attention; real tokens attend to them, padding stays masked.

Training-time reparameterisation (on by default): the L·2·d-wide prefix values come from
Embedding(p, d) → Linear(d, hidden) → Tanh → Linear(hidden, L·2·d). After training only the values
matter: `drop_reparameterization()` (and `save_adapter`) keep the p·L·2·d values and drop the MLP.
Gated (UniPELT): per block, P_K and P_V are multiplied by G(attention input). With grouped-query
attention there is one prefix key and value per key/value head, as the model's own keys have; on
decoders the prefix keys carry no rotary position and every query sees them
(backbones/extensions.py).

The flat value layout (p, L·2·heads·head_dim), block-major, keys before values, equals HF PEFT's
PREFIX_TUNING embedding, so values move between the two unchanged.

The values start random, or with `init="tokens"` as the keys and values the model itself gives
the token ids `init_tokens` (Li & Liang's init from real words' activations; methods/prefix_init.py;
the command line and the bench take the text, `init_text`). Those are the values themselves, so
they need `reparameterize=False`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from petlkit.backbones.extensions import add_extra_kv
from petlkit.config import MethodConfig, check_bool, check_choice, check_positive_int
from petlkit.errors import ConfigError
from petlkit.layout import layout_of
from petlkit.methods.base import Method
from petlkit.methods.gate import Gate
from petlkit.methods.placement import CastLinear, compute_dtype
from petlkit.methods.prefix_init import token_key_values
from petlkit.methods.prompt import check_init_tokens
from petlkit.methods.targeting import get_module
from petlkit.registry import register_method

PREFIX_INITS = ("random", "tokens")


@dataclasses.dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    """length: prefix tokens per block; reparameterize: produce the values with an MLP of width
    `hidden` while training; gated: multiply each block's prefix by a UniPELT gate; init:
    'random', or 'tokens' (the model's own keys and values for init_tokens, repeated to the
    length; needs reparameterize=False)."""

    length: int = 10
    reparameterize: bool = True
    hidden: int = 512
    gated: bool = False
    init: str = "random"
    init_tokens: tuple[int, ...] = ()

    def validate(self) -> None:
        check_positive_int("PrefixConfig", "length", self.length)
        check_positive_int("PrefixConfig", "hidden", self.hidden)
        check_bool("PrefixConfig", "reparameterize", self.reparameterize)
        check_bool("PrefixConfig", "gated", self.gated)
        check_choice("PrefixConfig", "init", self.init, PREFIX_INITS)
        check_init_tokens("PrefixConfig", "init", self.init, "init_tokens", self.init_tokens)
        if self.init == "tokens" and self.reparameterize:
            raise ConfigError(
                "PrefixConfig.init='tokens' starts the prefix values themselves as real tokens' "
                "keys and values, which the training MLP's output cannot start from; pass "
                "reparameterize=False"
            )


@register_method("prefix")
class Prefix(Method):
    config_cls = PrefixConfig
    transient = ("_kv", "_per_block")
    merge_refusal = "prefix tuning adds attention tokens, so it cannot fold into weights"

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        self.layout = layout = layout_of(model)
        width, depth = layout.width, layout.depth
        # keys and values per key/value head (grouped-query attention has fewer than queries)
        self.values_width = depth * 2 * layout.key_value_heads * layout.dim_per_head
        if cfg.reparameterize:
            self.embedding = nn.Parameter(torch.randn(cfg.length, width))
            self.mlp = nn.Sequential(
                CastLinear(width, cfg.hidden), nn.Tanh(), CastLinear(cfg.hidden, self.values_width)
            )
        elif cfg.init == "tokens":
            self.prefix = nn.Parameter(token_key_values(model, layout, cfg.init_tokens, cfg.length))
        else:
            self.prefix = nn.Parameter(torch.randn(cfg.length, self.values_width) * 0.02)
        if cfg.gated:
            self.gates = nn.ModuleList(Gate(width, causal=layout.causal) for _ in range(depth))
        self._kv: torch.Tensor | None = None
        self._per_block: dict = {}  # (dtype, device) → the blocks' keys and values, this forward
        encoder = get_module(model, layout.encoder) if layout.encoder else model
        self._handles = [encoder.register_forward_pre_hook(self._refresh)]
        self._handles += [
            add_extra_kv(model, layout, i, partial(self._block_kv, i)) for i in range(depth)
        ]

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def values(self) -> torch.Tensor:
        """The prefix values, (length, depth·2·width)."""
        if self.config.reparameterize:
            return self.mlp(self.embedding)
        return self.prefix

    def key_values(self) -> torch.Tensor:
        """(depth, 2, kv heads, length, head_dim): per block, the keys then the values."""
        layout = self.layout
        heads = layout.key_value_heads
        flat = self.values().view(self.config.length, layout.depth, 2, heads, layout.dim_per_head)
        return flat.permute(1, 2, 3, 0, 4)

    def _refresh(self, module: nn.Module, args: tuple) -> None:
        """Root pre-hook: compute all blocks' prefixes once per forward."""
        self._kv = self.key_values() if self.enabled else None
        self._per_block = {}

    def _block_kv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """(keys, values) of block `index`'s prefix for attention input x. Gated on an encoder,
        both are multiplied by the example's gate (Mao et al.). Gated on a causal model the gate
        is per query (gate.py), which no shared key can carry: instead each query's attention
        weights on the prefix are multiplied by its gate before normalisation, passed on as a
        third item, log G (batch, 1, queries, 1), that the attention adds to the prefix logits."""
        if not self.enabled:
            return None
        kv = self._block_key_values(x)[index]  # (2, kv heads, length, head_dim)
        batch = x.shape[0]
        if self.config.gated and not self.layout.causal:  # keys and values gated in one product
            key, value = GatedPrefix.apply(kv, self.gates[index](x).to(kv.dtype)).unbind(1)
            return key, value
        key, value = kv.unbind(0)
        key, value = key.expand(batch, *key.shape), value.expand(batch, *value.shape)
        if self.config.gated:  # causal: per query, see _block_kv's docstring
            g = self.gates[index](x).to(torch.float32)  # (batch, queries, 1)
            return key, value, g.clamp_min(1e-30).log().view(batch, 1, -1, 1)
        return key, value

    def _block_key_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's keys and values, (2, kv heads, length, head_dim), in the dtype the
        attention computes in (bf16 under autocast, where x, a layer-norm output, is float32),
        cast once per forward for all blocks (gated on an encoder, into a contiguous tensor: one
        copy where no cast is needed) and split with one unbind (whose backward is one
        stack)."""
        key = (compute_dtype(x), x.device)
        if key not in self._per_block:
            if self._kv is None:
                self._kv = self.key_values()
            kv = self._kv.to(device=x.device, dtype=key[0], memory_format=torch.contiguous_format)
            if self.config.gated and not self.layout.causal:  # as GatedPrefix reads them
                kv = kv.contiguous()
            self._per_block[key] = list(kv.unbind(0))
        return self._per_block[key]

    @torch.no_grad()
    def drop_reparameterization(self) -> None:
        """Replace the embedding + MLP by the values they produce (outputs unchanged)."""
        if not self.config.reparameterize:
            return
        values = self.values().detach().clone()
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(values)
        self.config = self.config.replace(reparameterize=False)
        self._kv, self._per_block = None, {}

    def export(self, model: nn.Module) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
        training_only = ("method.embedding", "method.mlp.")
        state = {k: v for k, v in self.trainable(model).items() if not k.startswith(training_only)}
        state["method.prefix"] = self.values().detach()
        return self.config.replace(reparameterize=False), state


class GatedPrefix(torch.autograd.Function):
    """G_b · kv for every example b: (batch, 2, heads, length, head_dim) from a block's keys and
    values kv (2, heads, length, head_dim) and its gate (batch, 1). The same function as the
    broadcast product; backward, kv's gradient Σ_b G_b·g_b and the gate's ⟨g_b, kv⟩ are one
    small GEMM each, where autograd's product node launches a product and a sum for each."""

    @staticmethod
    def forward(ctx, kv, gate):  # noqa: D102 (torch's interface)
        ctx.save_for_backward(kv, gate)
        return kv * gate.view(-1, 1, 1, 1, 1)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        kv, gate = ctx.saved_tensors
        flat = grad.reshape(gate.shape[0], -1)
        grad_kv = torch.mm(gate.t(), flat).view(kv.shape) if ctx.needs_input_grad[0] else None
        grad_gate = torch.mm(flat, kv.reshape(-1, 1)) if ctx.needs_input_grad[1] else None
        return grad_kv, grad_gate
