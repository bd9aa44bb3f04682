"""Fully sharded data parallel training (`fsdp=True`): torch's FSDP2 (`fully_shard`), the engine
Accelerate's FSDP plugin drives on GPUs, applied by the trainer itself so that the same loop runs
on CPU processes over gloo too (Accelerate's plugin needs CUDA devices).

Every block of the backbone (the layout's layers) and then the whole task model become FSDP
units: each process keeps 1/N of every weight, frozen or trained, and gathers a block's weights
only while it computes. Trained tensors, their gradients and the optimiser's state are sharded
alike. Checkpoints gather the trained tensors and their optimiser state only (never the frozen
base) and load back into the shards, so a killed run resumes as a DDP run does. The functions
here are no-ops on ordinary tensors, so the trainer calls them whether it shards or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from petlkit.errors import PetlError


def shard(petl: nn.Module) -> None:
    """Make every backbone block, then the whole model, an FSDP unit (in place)."""
    from torch.distributed.fsdp import fully_shard

    from petlkit.layout import layout_or_none

    layout = layout_or_none(petl.model)
    names = [b.block for b in layout.blocks if b.block] if layout is not None else []
    if not names:
        name = type(petl.model).__name__
        raise PetlError(f"fsdp shards a model block by block; petlkit knows no blocks of {name} "
                        "(declare its layout: docs/models.md)")  # fmt: skip
    blocks = {id(m): m for m in (petl.model.get_submodule(n) for n in names)}  # shared: once
    for block in blocks.values():
        fully_shard(block)
    fully_shard(petl)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a shard (a collective: every process must call it, in the same
    order); an ordinary tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: whole(p.detach()) for name, p in params.items()}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with whole tensors (every process calls it)."""
    state = optimizer.state_dict()
    return {
        "state": {
            i: {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in state["state"].items()
        },  # fmt: skip
        "param_groups": state["param_groups"],
    }


def like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `reference` is: sharded the same way for a shard."""
    if isinstance(reference, DTensor) and value.shape == reference.shape:
        value = value.to(device=reference.device, dtype=reference.dtype)
        return distribute_tensor(value, reference.device_mesh, reference.placements)
    return value


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into each process's shard of it."""
    param.copy_(like(param, value))


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A loaded optimizer state (whole tensors) laid out as the optimizer's parameters are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {
            i: {
                k: like(params[int(i)], v) if isinstance(v, torch.Tensor) else v
                for k, v in s.items()
            }
            for i, s in state["state"].items()
        },  # fmt: skip
        "param_groups": state["param_groups"],
    }


@contextlib.contextmanager
def whole_parameters(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within the block, the named parameters are whole, ordinary tensors on every process (to
    save or export them; run no forward of the sharded model inside)."""
    swapped = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters[attr]
        if isinstance(param, DTensor):
            module._parameters[attr] = nn.Parameter(whole(param.detach()), param.requires_grad)
            swapped.append((module, attr, param))
    try:
        yield
    finally:
        for module, attr, param in swapped:
            module._parameters[attr] = param
