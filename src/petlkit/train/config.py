"""Training hyper-parameters, validated like method configs."""

from __future__ import annotations

import dataclasses

from petlkit.config import (
    check_bool,
    check_choice,
    check_finite,
    check_positive_int,
    check_probability,
)
from petlkit.errors import ConfigError

PRECISIONS = ("no", "bf16", "fp16")
FOLD_MODES = ("off", "on", "auto")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """batch_size is the global batch: all processes and accumulation steps together.
    eval_every / checkpoint_every: in optimiser steps (0: only at the end)."""

    steps: int = 500
    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None  # None: the method's own default (Method.default_lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    eval_every: int = 100
    checkpoint_every: int = 100
    eval_batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    mixed_precision: str = "no"
    dist_timeout: int = 300  # seconds a process waits for the others before failing
    activation_checkpointing: bool = False  # recompute block activations: less memory, ~+1 fwd
    # train mergeable methods with the update folded into the weights: "off", "on", or "auto"
    # (time both forms on the first steps, keep the faster; train/folding.py)
    fold: str = "off"
    # language-model tasks: join training examples into rows of max_length tokens (each example
    # keeps its own attention; train/language_model.py)
    packing: bool = False
    # shard every weight, frozen or trained, across the processes (FSDP2; train/sharding.py)
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "max_length",
                     "dist_timeout"):  # fmt: skip
            check_positive_int("TrainConfig", name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if self.lr is not None:
            check_finite("TrainConfig", "lr", self.lr, positive=True)
        check_finite("TrainConfig", "weight_decay", self.weight_decay)
        check_finite("TrainConfig", "max_grad_norm", self.max_grad_norm)
        check_probability("TrainConfig", "warmup_ratio", self.warmup_ratio)
        check_choice("TrainConfig", "mixed_precision", self.mixed_precision, PRECISIONS)
        check_bool("TrainConfig", "activation_checkpointing", self.activation_checkpointing)
        check_choice("TrainConfig", "fold", self.fold, FOLD_MODES)
        check_bool("TrainConfig", "packing", self.packing)
        check_bool("TrainConfig", "fsdp", self.fsdp)
        if self.fsdp and self.fold != "off":
            raise ConfigError("TrainConfig: fold trains a merged copy of each weight, which fsdp "
                              "shards away; use fold='off' with fsdp")  # fmt: skip
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig: batch_size {self.batch_size} is not a multiple of grad_accum "
                f"{self.grad_accum}; pick a batch size that splits into equal micro-batches"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
