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
from petlkit.methods.linears import plain_linear
from petlkit.methods.placement import CastLinear, cast_side_by_side, compute_input, follow
from petlkit.methods.projections import JointProjections
from petlkit.methods.trained_casts import join, sharded


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
        self.callers: list[nn.Module] = []  # see join_projections
        self._forget()
        for gate in self.gates:
            gate.__dict__["_group"] = self

    def release(self) -> None:
        for gate in self.gates:
            gate.__dict__.pop("_group", None)
        self.callers = []

    def join_projections(self, callers: Sequence[nn.Module], query: int) -> None:
        """Compute the block's separate projections as one node (projections.py): callers[i]
        is the module whose forward returns linear i's output, a LoRA member of this group or a
        `SharedProjection`, whose `base_layer` is the linear. `query`: the index of the
        query's, which gets a storage of its own (JointProjections)."""
        self.callers, self._query = list(callers), query
        self._members = tuple(self.callers.index(lora) for lora in self.loras)

    def projection(self, caller: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        """`caller`'s output on h from the block's joint node, or None: compute alone (the
        node applies where autocast casts the linears' frozen weights, inside the model's
        forward, with every LoRA member on)."""
        if not self.callers or not _usable(self, h):
            return None
        index = next((i for i, c in enumerate(self.callers) if c is caller), None)
        if index is None:
            return None
        state = (h._version, torch.is_grad_enabled())
        if self._joint_source is None or self._joint_source() is not h or self._joint[0] != state:
            self._joint_source = weakref.ref(h)
            self._joint = (state, self._compute_projections(h))
            # h alive until every caller has its output, so that compute_input gives the next
            # caller this h (where nothing else keeps it: under activation checkpointing)
            self._held, self._handed = h, set()
        outputs = self._joint[1]
        self._handed.add(index)
        if len(self._handed) == len(self.callers):  # each has its output: the group keeps none
            self._held, self._joint_source, self._joint = None, None, None
        return None if outputs is None else outputs[index]

    def _compute_projections(self, h: torch.Tensor) -> tuple | None:
        linears = [caller.base_layer for caller in self.callers]  # as they are now
        if any(not lora.enabled or lora.folded for lora in self.loras):
            return None
        if any(plain_linear(m) is None for m in linears):
            return None
        tensors = [t for m in linears for t in (m.weight, m.bias) if t is not None]
        if (len(tensors) not in (len(linears), 2 * len(linears))
                or any(t.requires_grad or t.device != h.device or t.dtype == h.dtype
                       or sharded(t) for t in tensors)):  # fmt: skip
            return None  # autocast casts nothing here: each linear alone reads its own weight
        hidden = [self.lora_hidden(lora, h) for lora in self.loras]
        if any(x is None for x in hidden):
            return None
        weights = [m.weight for m in linears]
        biases = [m.bias for m in linears] if linears[0].bias is not None else []
        joined = cast_side_by_side([weights, biases] if biases else [weights], h.dtype)
        bias = joined[1] if biases else None
        pairs = [t for x, lora in zip(hidden, self.loras, strict=True)
                 for t in (x, follow(lora.lora_B, h))]  # fmt: skip
        sizes = tuple(m.out_features for m in linears)
        return JointProjections.apply(h, joined[0], bias, sizes, self._members, self._query,
                                      *pairs)  # fmt: skip

    def _forget(self) -> None:
        self._source, self._state, self._outputs = None, None, {}
        self._joint_source, self._joint, self._held, self._handed = None, None, None, set()

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
        if not _usable(self, h):
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


def _usable(group: GateGroup, h: torch.Tensor) -> bool:
    """The group computes for h: inside the model's forward (or a backward's recomputation),
    eagerly, on a (batch, tokens, width) input."""
    if torch.compiler.is_compiling() or h.dim() != 3:
        return False
    return group.active or _in_backward()


def _in_backward() -> bool:
    """True while autograd's engine runs a backward (where checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1
