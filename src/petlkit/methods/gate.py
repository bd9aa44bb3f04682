"""UniPELT's gate (Mao et al., 2022): G(h) = mean over tokens of σ(W_G·h_t + b_G), one scalar per
example; W_G ~ N(0, 0.02), b_G = 0, so every gate starts near σ(0) = 0.5."""

from __future__ import annotations

import torch
from torch import nn

from petlkit.methods.placement import CastLinear


class Gate(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = CastLinear(width, 1)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) → (batch,)."""
        return torch.sigmoid(self.linear(h)).mean(dim=(1, 2))


def gate_count(width: int) -> int:
    """Parameters of one gate."""
    return width + 1
