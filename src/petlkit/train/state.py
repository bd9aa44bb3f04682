"""Training checkpoints: trained parameters, optimiser and scheduler state, progress.

One safetensors file written atomically (temp file + rename): a kill at any moment leaves the
previous checkpoint whole. Tensors go in the file; everything else (step, best score, scheduler,
optimiser hyper-parameters) goes in its JSON metadata. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from petlkit.errors import CheckpointError
from petlkit.io import read_safetensors, write_safetensors
from petlkit.train.sharding import assign, shard_optimizer_state

CHECKPOINT = "checkpoint.safetensors"


def save_training_state(
    path: Path,
    params: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """`params` and `optimizer_state` (an `optimizer.state_dict()`) as whole tensors: a sharded
    run gathers them first (train/sharding.py)."""
    opt = optimizer_state
    tensors = {f"param.{n}": p.detach() for n, p in params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"info": info, "param_groups": opt["param_groups"], "optim_scalars": scalars}
    write_safetensors(path, tensors, {"petlkit_training_state": json.dumps(meta)})


def load_training_state(
    path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore parameters and optimiser in place (into each process's shards in a sharded run);
    returns the saved `info`."""
    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("petlkit_training_state")
    if raw is None:
        raise CheckpointError(f"{path} is not a petlkit training checkpoint (no training state)")
    meta = json.loads(raw)
    wanted = {f"param.{n}" for n in params}
    found = {k for k in tensors if k.startswith("param.")}
    if wanted != found:
        raise CheckpointError(
            f"{path} holds other parameters than this run trains (missing "
            f"{sorted(wanted - found)[:3]}, unexpected {sorted(found - wanted)[:3]}); was it "
            "written by a run with another method or backbone?"
        )
    for name, p in params.items():
        assign(p, tensors[f"param.{name}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    saved = {"state": state, "param_groups": meta["param_groups"]}
    optimizer.load_state_dict(shard_optimizer_state(saved, optimizer))
    return meta["info"]
