"""The optimisation recipe the trainer applies: batch order, learning-rate schedule, weight
decay, gradient clipping and accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.optim import adamw, weight_decay_groups
from petlkit.train.trainer import Trainer
from tests.train_job import build


def test_batches_shuffle_each_epoch_anew_and_cover_it_once():
    """Step k's batch depends only on (seed, k); each epoch is a fresh permutation of the
    training set, so every example is seen once per epoch, in a new order each time."""
    task = load_task("digits")
    n = len(task.splits["train"])  # 800; batch 48 makes steps straddle epoch boundaries

    def order(seed: int, steps: int) -> torch.Tensor:
        trainer = Trainer(build("lora"), task, TrainConfig(batch_size=48, seed=seed))
        return torch.cat([trainer.global_batch(k) for k in range(steps)])

    seen = order(seed=1, steps=2 * n // 48 + 1)
    first, second = seen[:n], seen[n : 2 * n]
    assert torch.equal(first.sort().values, torch.arange(n))  # each epoch covers the set once
    assert torch.equal(second.sort().values, torch.arange(n))
    assert not torch.equal(first, torch.arange(n))  # shuffled, not the file's order
    assert (first != second).float().mean() > 0.9  # a new order in the next epoch
    fresh = Trainer(build("lora"), task, TrainConfig(batch_size=48, seed=1))
    assert torch.equal(fresh.global_batch(30), seen[30 * 48 : 31 * 48])  # no state needed
    assert not torch.equal(order(seed=2, steps=1), seen[:48])  # the seed sets the order


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_zero(tmp_path):
    """The README's recipe: linear warm-up over warmup_ratio of the steps, then a cosine decay
    to zero at the last step; each log line holds the rate of the step that follows it."""
    cfg = TrainConfig(steps=20, batch_size=16, eval_every=0, checkpoint_every=0, lr=4e-3,
                      warmup_ratio=0.1, seed=0)  # fmt: skip
    Trainer(build("lora"), load_task("digits"), cfg, tmp_path, progress=False).fit()
    logged = [
        json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    warm = 2  # 10 % of 20 steps
    expected = [4e-3 * s / warm if s < warm
                else 4e-3 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (20 - warm)))
                for s in range(1, 21)]  # fmt: skip
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_weight_decay_reaches_matrices_only():
    """AdamW decays matrices; biases, norms, scales and other vectors are not pulled to zero."""
    model = build("sas")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decayed, kept = weight_decay_groups(params, 0.05)
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in params.items()}
    assert {by_id[id(p)] for p in decayed["params"]} == {n for n, p in params.items()
                                                         if p.dim() >= 2}  # fmt: skip
    assert any("bias" in by_id[id(p)] for p in kept["params"])  # the head's bias, SaS's shifts
    assert len(decayed["params"]) + len(kept["params"]) == len(params)


def test_adamw_is_fused_where_the_run_steps_on_cuda_and_pytorchs_default_elsewhere():
    """On CUDA the fused AdamW (two launches per tensor chunk, where the default multi-tensor
    form launches nine); on the CPU PyTorch's default, as every published CPU run trained; a
    sharded (FSDP) run keeps the default. Decided by the run's device, not the parameters': the
    trainer makes the optimizer before it moves the model there."""
    params = {0: torch.nn.Parameter(torch.zeros(2, 2)), 1: torch.nn.Parameter(torch.zeros(2))}
    groups = weight_decay_groups(params, 0.1)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert adamw(groups, 1e-3, cuda, sharded=False).defaults["fused"] is True
    assert adamw(groups, 1e-3, cpu, sharded=False).defaults["fused"] is None
    assert adamw(groups, 1e-3, cuda, sharded=True).defaults["fused"] is None


def test_the_trainer_asks_for_the_optimizer_of_its_device(tmp_path, monkeypatch):
    import petlkit.train.trainer as trainer_module

    asked = []

    def recording(groups, lr, device, sharded):
        asked.append((device, sharded))
        raise KeyboardInterrupt  # enough: the rest of the run is other tests' subject

    monkeypatch.setattr(trainer_module, "adamw", recording)
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, checkpoint_every=0, seed=0)
    trainer = Trainer(build("lora"), load_task("digits"), cfg, tmp_path, progress=False)
    cuda = torch.device("cuda")  # a run on a GPU, whose model is still on the CPU at this point
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: cuda))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert asked == [(cuda, False)]


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    """Clipping to a tiny norm shrinks Adam's first step (its update is g / (|g| + eps)); with
    clipping off, the step is the usual one."""
    moved = {}
    for norm in (0.0, 1e-9):
        model = build("lora")
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        cfg = TrainConfig(steps=1, batch_size=16, eval_every=0, checkpoint_every=0, lr=1e-2,
                          warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=norm)  # fmt: skip
        Trainer(model, load_task("digits"), cfg, progress=False).fit()
        after = dict(model.named_parameters())
        moved[norm] = max((after[n] - b).abs().max().item() for n, b in before.items())
    assert moved[0.0] == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr·sign(g)
    assert moved[1e-9] < 0.2 * moved[0.0]


def test_gradient_accumulation_equals_the_full_batch():
    finals = []
    for accum in (1, 4):
        model = build("lora")
        cfg = TrainConfig(steps=5, batch_size=16, grad_accum=accum, eval_every=0,
                          checkpoint_every=0, max_grad_norm=0.0)  # fmt: skip
        Trainer(model, load_task("digits"), cfg, progress=False).fit()
        finals.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=0, atol=1e-5)
