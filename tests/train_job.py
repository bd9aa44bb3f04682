"""A small real training job (a tiny ViT on scikit-learn digits), run as its own process by the
trainer tests: `python -m tests.train_job OUT [--resume] [--method M] [--step-delay S]`, or under
`torchrun --nproc_per_node 2 -m tests.train_job ...`."""

from __future__ import annotations

import argparse
import time

import torch

import petlkit
from petlkit.backbones import vit
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.method)
    if args.step_delay:  # slows every forward so a test can kill the run mid-way
        model.register_forward_pre_hook(lambda m, a: time.sleep(args.step_delay))
    Trainer(model, load_task("digits"), CONFIG, args.out, progress=False).fit(resume=args.resume)


if __name__ == "__main__":
    main()
