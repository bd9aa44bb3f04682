"""UniPELT's gate (Mao et al., 2022): G(h) = mean over tokens of σ(W_G·h_t + b_G), one scalar per
example; W_G ~ N(0, 0.02), b_G = 0, so every gate starts near σ(0) = 0.5. As in the original code
the mean runs over every position of the sequence, padding included. `outputs` > 1 gives several
independent gates over the same input (one per part of a fused q|k|v projection).

On causal models (decoders) a mean over the sequence would let every position read the tokens after
it (and a KV cache could not reproduce it), so the gate is per position there:
G(h)_t = σ(W_G·h_t + b_G) (`causal=True`; a documented adaptation, docs/methods/unipelt.md)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from petlkit.methods.grouped_down import GroupedDown
from petlkit.methods.placement import CastLinear, compute_input, follow
from petlkit.methods.trained_casts import join


class Gate(nn.Module):
    def __init__(self, width: int, outputs: int = 1, causal: bool = False) -> None:
        super().__init__()
        self.linear = CastLinear(width, outputs)
        self.causal = causal
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) → (batch, outputs); causal: (batch, tokens, outputs)."""
        h = compute_input(h)
        group = self.__dict__.get("_group")
        together = None if group is None else group.output(self, h)
        if together is not None:
            return together
        g = torch.sigmoid(self.linear(h))
        return g if self.causal else g.mean(dim=1)

    def per_position(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens or 1, outputs): the gate broadcast over positions."""
        g = self(h)
        return g if self.causal else g.unsqueeze(1)


def gate_count(width: int, outputs: int = 1) -> int:
    """Parameters of one gate."""
    return (width + 1) * outputs


class GateGroup:
    """Gates that read one tensor (UniPELT's LoRA gates on q and v and its prefix gate all read a
    block's attention input), computed as one gate with their weights stacked, and with them the
    down-projections of the LoRA members whose gates they are (`loras`: gate → its LoRA layer):
    one node, one GEMM forward and one for x's gradient backward (grouped_down.py), where each
    alone costs its own. The same function: each gate's outputs are its columns, each member's
    gated hidden its rows. Used inside a forward of the model (`begin` and `end` are its hooks:
    the result keeps autograd history, which must not outlive the forward) and inside a
    backward (activation checkpointing recomputes the forward there, and must save what the
    forward saved); a gate or a LoRA layer called elsewhere, or on another tensor, computes
    alone."""

    def __init__(self, gates: Sequence[Gate], loras: dict[int, nn.Module] | None = None) -> None:
        if len({g.causal for g in gates}) != 1:
            raise ValueError("a gate group needs gates of one kind (all causal or none)")
        loras = loras or {}
        # LoRA members first: their A rows lead the stacked weight, their gates its gate columns
        self.gates = sorted(gates, key=lambda g: id(g) not in loras)
        self.loras = [loras[id(g)] for g in self.gates if id(g) in loras]
        if len({lora.r for lora in self.loras}) > 1:
            raise ValueError("a gate group's LoRA members need one rank")
        self.rank = self.loras[0].r if self.loras else 0
        self.active = False
        self._forget()
        for gate in self.gates:
            gate.__dict__["_group"] = self

    def release(self) -> None:
        for gate in self.gates:
            gate.__dict__.pop("_group", None)

    def _forget(self) -> None:
        self._source, self._state, self._outputs = None, None, {}

    def begin(self, module: nn.Module, args: tuple) -> None:
        self._forget()
        self.active = True

    def end(self, module: nn.Module, args: tuple, output) -> None:
        self._forget()
        self.active = False

    def output(self, gate: Gate, h: torch.Tensor) -> torch.Tensor | None:
        """`gate(h)` from the group's one computation, or None: compute alone."""
        return self._lookup(gate, h, ("gate", id(gate)))

    def lora_hidden(self, lora: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        """The LoRA member's gated hidden (h·Aᵀ) ⊙ G, (tokens, parts·r), or None: alone."""
        return self._lookup(lora.gate, h, ("lora", id(lora)))

    def _lookup(self, gate: Gate, h: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or not (self.active or _in_backward()) or h.dim() != 3:
            return None
        state = (h._version, torch.is_grad_enabled())
        if self._source is None or (self._source() is not h and gate is self.gates[0]):
            self._compute(h)
            self._source, self._state = weakref.ref(h), state
        if self._source() is not h or self._state != state:
            return None
        return self._outputs.get(key)

    def _compute(self, h: torch.Tensor) -> None:
        loras = self.loras
        others = self.gates[len(loras) :]
        weights = [lora.lora_A for lora in loras] + [g.linear.weight for g in self.gates]
        biases = [g.linear.bias for g in self.gates]
        join(tuple(weights))  # read side by side by the node (trained_casts.py)
        join(tuple(biases))
        weights, biases = [follow(w, h) for w in weights], [follow(b, h) for b in biases]
        plan = (tuple(lora.gate.linear.out_features for lora in loras), self.rank,
                tuple(g.linear.out_features for g in others))  # fmt: skip
        outputs = GroupedDown.apply(h, plan, self.gates[0].causal, *weights, *biases)
        keys = [("lora", id(lora)) for lora in loras] + [("gate", id(g)) for g in others]
        self._outputs = dict(zip(keys, outputs, strict=True))


def _in_backward() -> bool:
    """True while autograd's engine runs a backward (where checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1
