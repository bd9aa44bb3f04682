"""Training memory: the peak a run reports, and activation checkpointing (recompute each block's
activations in the backward pass instead of keeping them)."""

from __future__ import annotations

import torch
from torch import nn

from petlkit.errors import PetlError


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of training so far: on a GPU the tensors torch allocated, on the CPU the
    process's peak resident size (which also counts Python and the libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def checkpoint_activations(task_model: nn.Module) -> None:
    """Switch on activation checkpointing: petlkit backbones switch it on themselves,
    transformers models through their gradient checkpointing (non-reentrant, so frozen inputs
    still pass gradients to the methods' tensors)."""
    switch = getattr(task_model, "set_activation_checkpointing", None)
    if switch is not None:
        switch(True)
        return
    if not getattr(task_model, "supports_gradient_checkpointing", False):
        name = type(task_model).__name__
        raise PetlError(f"{name} has no activation checkpointing; use a petlkit backbone or "
                        "a transformers model that supports it")  # fmt: skip
    enable = getattr(task_model, "activation_checkpointing_enable", None)
    enable = enable or task_model.gradient_checkpointing_enable  # before transformers 5.x
    enable({"use_reentrant": False})
    if getattr(task_model.config, "use_cache", False):
        task_model.config.use_cache = False  # a cache is of no use to a training forward
