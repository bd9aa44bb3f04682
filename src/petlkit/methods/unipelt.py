"""UniPELT (Mao et al., 2022) and UniPELT+prompt (seed paper 002), as a union of library methods.

UniPELT = gated LoRA on q and v (r = 8) + gated prefix tuning (p = 10, MLP of width 512 while
training) + a gated Pfeiffer adapter (reduction 16, ReLU); variant AP drops LoRA. UniPELT+prompt
adds a layer of n = 10 soft prompt tokens in front of the input (a documented reconstruction:
docs/methods/unipelt.md). Each part is the library's own method, built from this config, so a
part behaves here exactly as it does alone; any part can be left out and the gates switched off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from petlkit.backbones.prompt_tokens import PROMPT_PLACEMENTS
from petlkit.config import (
    MethodConfig,
    check_bool,
    check_choice,
    check_finite,
    check_positive_int,
    check_range,
)
from petlkit.errors import ConfigError
from petlkit.layout import layout_of
from petlkit.methods.adapter import ACTIVATIONS, AdapterConfig
from petlkit.methods.base import Method
from petlkit.methods.gate import GateGroup
from petlkit.methods.lora import LoRAConfig
from petlkit.methods.prefix import PrefixConfig
from petlkit.methods.projections import SharedProjection
from petlkit.methods.prompt import PROMPT_INITS, PromptConfig, check_init_tokens
from petlkit.methods.targeting import get_slot
from petlkit.registry import method_class, register_method

SUBMODULES = ("adapter", "prefix", "lora")


@dataclasses.dataclass(frozen=True)
class UniPELTConfig(MethodConfig):
    """submodules: any of 'adapter', 'prefix', 'lora'; gated: UniPELT's gates on them;
    prompt: add the prompt-tuning layer (prompt_length tokens, gated if prompt_gated, started
    as prompt_init: 'uniform', 'vocab' or 'tokens' (prompt_init_tokens), as PromptConfig.init).
    Per part: lora_r, lora_alpha (used only ungated: a gate replaces alpha / r),
    prefix_length, prefix_hidden, prefix_reparameterize, adapter_reduction,
    adapter_non_linearity."""

    submodules: Sequence[str] = SUBMODULES
    gated: bool = True
    prompt: bool = False
    prompt_length: int = 10
    prompt_gated: bool = False
    prompt_placement: str = "after_embeddings"
    prompt_init: str = "uniform"
    prompt_init_tokens: tuple[int, ...] = ()
    lora_r: int = 8
    lora_alpha: float = 16.0
    prefix_length: int = 10
    prefix_hidden: int = 512
    prefix_reparameterize: bool = True
    adapter_reduction: int = 16
    adapter_non_linearity: str = "relu"
    adapter_up_init: str = "zero"  # "bert": N(0, 0.02), as the original code initialises it

    def validate(self) -> None:
        owner = type(self).__name__
        for part in self.submodules:
            check_choice(owner, "submodules", part, SUBMODULES)
        if len(set(self.submodules)) != len(self.submodules):
            raise ConfigError(f"{owner}.submodules names a part twice: {list(self.submodules)}")
        for name in ("gated", "prompt", "prompt_gated", "prefix_reparameterize"):
            check_bool(owner, name, getattr(self, name))
        if not self.submodules and not self.prompt:
            raise ConfigError(f"{owner}: nothing to train; name submodules or set prompt=true")
        for name in ("prompt_length", "lora_r", "prefix_length", "prefix_hidden"):
            check_positive_int(owner, name, getattr(self, name))
        check_positive_int(owner, "adapter_reduction", self.adapter_reduction)
        check_finite(owner, "lora_alpha", self.lora_alpha, positive=True)
        check_range(owner, "lora_alpha", self.lora_alpha, 0, 1e4)
        check_choice(owner, "adapter_non_linearity", self.adapter_non_linearity, tuple(ACTIVATIONS))
        check_choice(owner, "prompt_placement", self.prompt_placement, PROMPT_PLACEMENTS)
        check_choice(owner, "prompt_init", self.prompt_init, PROMPT_INITS)
        check_init_tokens(owner, "prompt_init", self.prompt_init, "prompt_init_tokens",
                          self.prompt_init_tokens)  # fmt: skip

    def part_configs(self) -> dict[str, MethodConfig]:
        """The config of each part, in the order they are attached."""
        parts: dict[str, MethodConfig] = {}
        if "lora" in self.submodules:
            parts["lora"] = LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, gated=self.gated)
        if "prefix" in self.submodules:
            parts["prefix"] = PrefixConfig(
                length=self.prefix_length,
                hidden=self.prefix_hidden,
                reparameterize=self.prefix_reparameterize,
                gated=self.gated,
            )
        if "adapter" in self.submodules:
            parts["adapter"] = AdapterConfig(
                placement="pfeiffer",
                reduction_factor=self.adapter_reduction,
                non_linearity=self.adapter_non_linearity,
                gated=self.gated,
                up_init=self.adapter_up_init,
            )
        if self.prompt:
            parts["prompt"] = PromptConfig(
                length=self.prompt_length,
                gated=self.prompt_gated,
                placement=self.prompt_placement,
                init=self.prompt_init,
                init_tokens=self.prompt_init_tokens,
            )
        return parts


@register_method("unipelt")
class UniPELT(Method):
    config_cls = UniPELTConfig

    def attach(self, model: nn.Module) -> None:
        self.parts = nn.ModuleDict()
        for key, config in self.config.part_configs().items():
            part = method_class(config.method)(config, f"{self.name}.{key}")
            part.attach(model)
            self.parts[key] = part
        self.merge_refusal = next(
            (f"its {k} part: {p.merge_refusal}" for k, p in self.parts.items() if p.merge_refusal),
            None,
        )
        self._group_gates(model)

    def _group_gates(self, model: nn.Module) -> None:
        """One GateGroup per block for the gates that read its attention input (the LoRA gates
        of q, v or q|k|v and the prefix gate): one batched gate per block (methods/gate.py)."""
        self._groups: list[GateGroup] = []
        self._handles: list = []
        if not self.config.gated or "prefix" not in self.parts:
            return
        lora = self.parts["lora"].tuners(model) if "lora" in self.parts else []
        lora = {name: tuner for name, tuner in lora if tuner.gate is not None}
        prefix = self.parts["prefix"]
        for index, block in enumerate(layout_of(model).blocks):
            _, linears = block.site("attn_in")
            tuners = [lora[n] for n in linears if n in lora]
            gates = [t.gate for t in tuners] + [prefix.gates[index]]
            # a LoRA layer without dropout reads its gated hidden from the group's node
            members = {id(t.gate): t for t in tuners if isinstance(t.dropout, nn.Identity)}
            if len(gates) > 1:
                group = GateGroup(gates, members)
                self._groups.append(group)
                self._join_projections(model, group, block, lora)
        if self._groups:
            self._handles = [model.register_forward_pre_hook(self._begin),
                             model.register_forward_hook(self._end)]  # fmt: skip

    def _join_projections(self, model: nn.Module, group: GateGroup, block, lora: dict) -> None:
        """Where a block's q, k and v are separate plain linears and the group's LoRA members
        adapt some of them (BERT: q and v), the group computes all three as one node
        (projections.py); the others are wrapped to hand out their columns."""
        names = [n for n in block.site("attn_in")[1] if n]
        if len(names) != 3 or len(set(names)) != 3 or block.query not in names or not group.loras:
            return
        members = {id(m) for m in group.loras}
        if any(n in lora and id(lora[n]) not in members for n in names):
            return  # a LoRA layer outside the group (with dropout) computes alone
        callers = [lora[n] if n in lora else model.get_submodule(n) for n in names]
        linears = [c.base_layer if n in lora else c for n, c in zip(names, callers, strict=True)]
        if any(type(m) is not nn.Linear or m.in_features != linears[0].in_features
               or (m.bias is None) != (linears[0].bias is None) for m in linears):  # fmt: skip
            return
        for i, name in enumerate(names):
            if name not in lora:
                shared = self.wrap(model, name, lambda base: SharedProjection(base, self.name))
                shared.group = group
                callers[i] = shared
        group.join_projections(callers, names.index(block.query))

    def _begin(self, module: nn.Module, args: tuple) -> None:
        for group in self._groups:
            group.begin(module, args)

    def _end(self, module: nn.Module, args: tuple, output) -> None:
        for group in self._groups:
            group.end(module, args, output)

    def detach(self, model: nn.Module) -> None:
        for name, tuner in self.tuners(model):
            if isinstance(tuner, SharedProjection):
                self._unwrap(*get_slot(model, name), tuner)
        for handle in getattr(self, "_handles", []):
            handle.remove()
        for group in getattr(self, "_groups", []):
            group.release()
        self._handles, self._groups = [], []
        for part in reversed(list(self.parts.values())):
            part.detach(model)

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        self.enabled = enabled
        for part in self.parts.values():
            part.set_enabled(model, enabled)

    def merge(self, model: nn.Module) -> None:
        self.check_mergeable()
        for part in self.parts.values():
            part.merge(model)

    def unmerge(self, model: nn.Module) -> None:
        for part in reversed(list(self.parts.values())):
            part.unmerge(model)

    @property
    def merged(self) -> bool:
        return any(part.merged for part in self.parts.values())

    def drop_reparameterization(self) -> None:
        """Keep only the prefix values (see Prefix.drop_reparameterization)."""
        if "prefix" in self.parts:
            self.parts["prefix"].drop_reparameterization()
            self.config = self.config.replace(prefix_reparameterize=False)

    def export(self, model: nn.Module) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
        state: dict[str, torch.Tensor] = {}
        for key, part in self.parts.items():
            _, tensors = part.export(model)
            for name, tensor in tensors.items():
                if name.startswith("method."):
                    name = f"method.parts.{key}." + name.removeprefix("method.")
                state[name] = tensor
        return self.config.replace(prefix_reparameterize=False), state


@dataclasses.dataclass(frozen=True)
class UniPELTAPConfig(UniPELTConfig):
    """UniPELT (AP): gated adapter + gated prefix, no LoRA."""

    submodules: Sequence[str] = ("adapter", "prefix")


@register_method("unipelt-ap")
class UniPELTAP(UniPELT):
    config_cls = UniPELTAPConfig


@dataclasses.dataclass(frozen=True)
class UniPELTPromptConfig(UniPELTConfig):
    """UniPELT (APL) + the prompt-tuning layer of seed paper 002."""

    prompt: bool = True


@register_method("unipelt-prompt")
class UniPELTPrompt(UniPELT):
    config_cls = UniPELTPromptConfig
