"""A small real training job (a tiny ViT on scikit-learn digits), run as its own process by the
trainer tests: `python -m tests.train_job OUT [--resume] [--method M] [--step-delay S]`, or under
`torchrun --nproc_per_node 2 -m tests.train_job ...`."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import petlkit
from petlkit.backbones import vit
from petlkit.errors import PetlError, TrainingInterrupted
from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer

CONFIG = TrainConfig(steps=40, batch_size=32, eval_every=10, checkpoint_every=10, lr=3e-3, seed=5)


def build(method: str) -> petlkit.PetlModel:
    torch.manual_seed(0)
    model = vit("vit_tiny", img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32,
                num_heads=2, num_classes=10)  # fmt: skip
    return petlkit.attach(model, method)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--nan-at", type=int, default=0, help="make the loss NaN from this step")
    parser.add_argument("--die-at", type=int, default=0, help="rank 1 exits hard at this step")
    parser.add_argument("--fsdp", action="store_true", help="shard the model (FSDP2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.method)
    if args.step_delay:  # slows every forward so a test can kill the run mid-way
        model.register_forward_pre_hook(lambda m, a: time.sleep(args.step_delay))
    if args.nan_at:
        calls = [0]

        def poison(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] >= args.nan_at:
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
    if args.die_at:
        steps = [0]

        def die(module, inputs):
            steps[0] += module.training
            if steps[0] >= args.die_at and os.environ.get("RANK") == "1":
                os._exit(3)

        model.register_forward_pre_hook(die)
    config = CONFIG.__class__(**{**CONFIG.to_dict(), "dist_timeout": 20, "fsdp": args.fsdp})
    trainer = Trainer(model, load_task("digits"), config, args.out, progress=False)
    try:
        trainer.fit(resume=args.resume)
    except PetlError as err:
        print(f"petlkit: {err}", file=sys.stderr)
        sys.exit(130 if isinstance(err, TrainingInterrupted) else 2)


if __name__ == "__main__":
    main()
