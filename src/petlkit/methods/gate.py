"""UniPELT's gate (Mao et al., 2022): G(h) = mean over tokens of σ(W_G·h_t + b_G), one scalar per
example; W_G ~ N(0, 0.02), b_G = 0, so every gate starts near σ(0) = 0.5. As in the original code
the mean runs over every position of the sequence, padding included. `outputs` > 1 gives several
independent gates over the same input (one per part of a fused q|k|v projection).

On causal models (decoders) a mean over the sequence would let every position read the tokens after
it (and a KV cache could not reproduce it), so the gate is per position there:
G(h)_t = σ(W_G·h_t + b_G) (`causal=True`; a documented adaptation, docs/methods/unipelt.md)."""

from __future__ import annotations

import torch
from torch import nn

from petlkit.methods.placement import CastLinear, compute_input


class Gate(nn.Module):
    def __init__(self, width: int, outputs: int = 1, causal: bool = False) -> None:
        super().__init__()
        self.linear = CastLinear(width, outputs)
        self.causal = causal
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) → (batch, outputs); causal: (batch, tokens, outputs)."""
        g = torch.sigmoid(self.linear(compute_input(h)))
        return g if self.causal else g.mean(dim=1)

    def per_position(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens or 1, outputs): the gate broadcast over positions."""
        g = self(h)
        return g if self.causal else g.unsqueeze(1)


def gate_count(width: int, outputs: int = 1) -> int:
    """Parameters of one gate."""
    return (width + 1) * outputs
