"""Small helpers the tests share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_steps(model, inputs, labels, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the trainable parameters (dropout off for exact comparisons)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(**inputs), labels).backward()
        opt.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bench_record(task, method, seed, score, trainable, group="g", **extra):
    """A results.jsonl record of a bench cell, for report tests."""
    return {"cell": f"{task}-{method}-{seed}", "task": task, "group": group, "method": method,
            "seed": seed, "shots": None, "metric": "accuracy", "score": score,
            "trainable": trainable, "percent": trainable / 1e4, "lr": 1e-3,
            "grid": [3e-4, 1e-3, 3e-3], "edge": None, **extra}  # fmt: skip
