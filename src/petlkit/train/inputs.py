"""Which examples go in which batch, and how texts fit the model: the training batches of each step,
the token budget an encoder leaves once prompt tokens take positions, and the evaluation order
that lets each batch pad to about its own length."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from petlkit.tasks.base import Split, Task


def token_budget(model: nn.Module, max_length: int) -> int:
    """max_length, cut (with a warning) to what the encoder's positions allow once prompt tokens
    are added in front."""
    from petlkit.methods.prompt import Prompt

    encoder = getattr(model.model, "encoder", None)
    limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if limit is None:
        return max_length
    if encoder.config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # positions start after the padding index
    limit -= sum(  # prompts in front of the word embeddings take positions
        m.config.length
        for m in model.modules()
        if isinstance(m, Prompt) and m.config.placement == "before_embeddings"
    )
    if max_length > limit:
        warnings.warn(
            f"max_length {max_length} is more than the encoder's {limit} free positions; longer "
            f"inputs are cut to {limit} tokens",
            stacklevel=3,
        )
        return limit
    return max_length


def without_full_mask(inputs: dict) -> dict:
    """The batch without its attention mask where the mask masks nothing (no padding): the model
    then attends everywhere, the same function. Decided here, on the host, where the batch is
    built: given the mask on the device, transformers asks the device whether it is all ones,
    which makes the host wait for the device once per step (issue #47). A padded batch keeps its
    mask (and transformers' question)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.device.type != "cpu" or not bool(mask.all()):
        return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def eval_order(task: Task, split: Split) -> torch.Tensor:
    """Texts by length, so each batch pads to about its own length (same scores, less compute);
    other inputs in order."""
    if task.modality != "text":
        return torch.arange(len(split))
    lengths = [sum(len(part) for part in t) if task.pair else len(t) for t in split.inputs]
    return torch.tensor(sorted(range(len(split)), key=lengths.__getitem__), dtype=torch.long)


class BatchOrder:
    """The example indices of each optimiser step: epoch-wise permutations drawn from the seed, so
    a step's batch depends on (seed, step) alone and a resumed run sees the same batches."""

    def __init__(self, seed: int, n: int, size: int) -> None:
        self.seed, self.n, self.size = seed, n, size
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def __call__(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.size, (step + 1) * self.size)
        epochs = positions // self.n
        out = torch.empty(self.size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._epoch(epoch)[positions[mask] % self.n]
        return out

    def _epoch(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch `epoch`, drawn once (not at every step of the epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]
