"""`petlkit pretrain`: the project's own small pretrained ViT.

No pretrained ViT installs offline, so the project pretrains one on Fashion-MNIST (60,000 images,
28×28 grey; the Debian package `dataset-fashion-mnist`) with the library's own trainer (full
fine-tuning from a seeded random init), and ships the result as `assets/vit-fmnist.safetensors`
(timm names, float16, recipe and source accuracy in the metadata). Re-running the recipe with the
same seed on CPU rebuilds the same weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from petlkit.backbones.vit import VisionTransformer, ViTConfig
from petlkit.backbones.vit_weights import save_vit
from petlkit.model import attach
from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer

SHIPPED = Path(__file__).parent / "assets" / "vit-fmnist.safetensors"


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """ViT-Tiny width (192, 3 heads) at half depth; 7-px patches: 16 tokens + [CLS] per image."""

    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 7
    steps: int = 3000  # ~7 epochs of the 55,000 training images at batch 128
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    seed: int = 0

    def vit_config(self) -> ViTConfig:
        return ViTConfig(img_size=28, patch_size=self.patch_size, in_chans=1, num_classes=10,
                         embed_dim=self.embed_dim, depth=self.depth,
                         num_heads=self.num_heads)  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                           eval_every=500, checkpoint_every=250, eval_batch_size=500,
                           seed=self.seed)  # fmt: skip


def pretrain(
    output: str | Path,
    work_dir: str | Path,
    recipe: PretrainRecipe,
    resume: bool = False,
    task: str = "fashion-mnist",
) -> dict:
    """Train the recipe's ViT on `task` (28×28 grey images) in `work_dir` (resumable), keep the
    best validation step, and write it to `output` in float16 with its test accuracy as stored."""
    task = load_task(task)
    torch.manual_seed(recipe.seed)
    backbone = VisionTransformer(recipe.vit_config())
    model = attach(backbone, "full")
    trainer = Trainer(model, task, recipe.train_config(), work_dir, progress=True)
    results = trainer.fit(resume=resume)
    with torch.no_grad():  # score the weights exactly as they are shipped
        for p in backbone.parameters():
            p.copy_(p.half().float())
    stored = trainer.evaluate("test")
    summary = {"task": task.name, "recipe": dataclasses.asdict(recipe), "val": results["val"],
               "test_float32": results["test"], "test": stored}  # fmt: skip
    state = {k: v.half() for k, v in backbone.state_dict().items()}
    save_vit(backbone, output, state=state, extra={"petlkit_pretrain": json.dumps(summary)})
    return summary


def pretrain_info(path: str | Path = SHIPPED) -> dict | None:
    """The recipe and source accuracy stored in a checkpoint `pretrain` wrote (None otherwise)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("petlkit_pretrain")
    return None if text is None else json.loads(text)
