"""The trainer's small helpers: AdamW parameter groups, the method's default learning rate, and
Ctrl-C turned into a flag the training loop checks between steps."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch

from petlkit.errors import PetlError
from petlkit.model import PetlModel


def catch_interrupt() -> tuple[list[bool], Callable[[], None]]:
    """Turn SIGINT into a flag the loop checks between steps (a step is never cut in half)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None

    def handler(signum, frame) -> None:
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    return flag, lambda: signal.signal(signal.SIGINT, previous)


def weight_decay_groups(params: dict[str, torch.nn.Parameter], decay: float) -> list[dict]:
    """Matrices decay; biases, norms, scales, gates' biases and other vectors do not."""
    with_decay = [p for p in params.values() if p.dim() >= 2]
    without = [p for p in params.values() if p.dim() < 2]
    return [{"params": with_decay, "weight_decay": decay}, {"params": without, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, device: torch.device, sharded: bool) -> torch.optim.AdamW:
    """AdamW as the trainer steps it on `device`, where the parameters go before the first step
    (they may still be on the CPU when it is made). On CUDA, unsharded, the fused form: two
    multi-tensor launches per chunk of tensors, where PyTorch's default there (its multi-tensor
    form) launches nine (issue #47: a PETL method's many small tensors make the step a queue of
    launches). Elsewhere PyTorch's default for the device: on the CPU its per-tensor loop, the
    form every published CPU number was trained with."""
    fused = device.type == "cuda" and not sharded
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def default_lr(model: PetlModel) -> float:
    """The active method's default learning rate (one method active; else ask for one)."""
    rates = {model.methods[n].default_lr for n in model.active}
    if len(rates) != 1:
        raise PetlError(
            f"methods {model.active} have different default learning rates {sorted(rates)}; "
            "pass one (TrainConfig(lr=...), --lr)"
        )
    return rates.pop()
