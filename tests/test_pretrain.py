"""`petlkit pretrain` and the shipped ViT: a file `--backbone` can name, with its recipe inside."""

from __future__ import annotations

import pytest
import torch

from petlkit.backbones import build_model
from petlkit.backbones.vit_weights import load_vit
from petlkit.data.fashion_mnist import FOLDER as FASHION_MNIST
from petlkit.pretrain import SHIPPED, PretrainRecipe, pretrain, pretrain_info
from petlkit.run import RunSpec
from petlkit.tasks import load_task

TINY = PretrainRecipe(embed_dim=32, depth=1, num_heads=2, steps=4, batch_size=16)


def test_pretrain_writes_a_float16_timm_file_with_its_recipe_and_resumes(tmp_path):
    out = tmp_path / "vit.safetensors"
    summary = pretrain(out, tmp_path / "work", TINY, task="mnist-5k")
    info = pretrain_info(out)
    assert info == summary and info["recipe"]["depth"] == 1 and info["task"] == "mnist-5k"
    assert 0.0 <= info["test"]["accuracy"] <= 1.0
    model = load_vit(out)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (32, 1, 2)
    assert (model.cfg.patch_size, model.cfg.img_size, model.cfg.in_chans) == (7, 28, 1)
    again = tmp_path / "again.safetensors"  # the finished run resumes to the same weights
    assert pretrain(again, tmp_path / "work", TINY, resume=True, task="mnist-5k") == summary
    assert torch.equal(load_vit(again).pos_embed, model.pos_embed)


def test_the_shipped_vit_loads_by_name_with_its_source_accuracy():
    info = pretrain_info(SHIPPED)
    assert info["task"] == "fashion-mnist" and info["test"]["accuracy"] >= 0.85, info
    model = build_model("vit-fmnist", num_classes=5).model
    assert model.cfg.img_size == 28 and model.head.out_features == 5
    shipped = load_vit(SHIPPED)  # the backbone weights are the file's, a new head is fresh
    assert torch.equal(model.blocks[0].attn.qkv.weight, shipped.blocks[0].attn.qkv.weight)


def test_small_images_are_resized_to_the_pretrained_input():
    spec = RunSpec(backbone="vit-fmnist", method="sas", task="digits")  # 8×8 digits
    built, task = spec.build_and_load()
    assert task.image_size == 28 and task.splits["train"].inputs.shape[1:] == (1, 28, 28)
    logits = built.model(task.splits["train"].inputs[:2])
    assert logits.shape == (2, 10)


def test_grey_tasks_become_rgb_for_a_three_channel_backbone():
    task = load_task("digits").with_images(32, 3)
    x = task.splits["test"].inputs
    assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(Exception, match="only grey → RGB"):
        task.with_images(32, 4)


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason="opt-in data (root): apt-get update && apt-get install -y dataset-fashion-mnist",
)
def test_the_shipped_vit_scores_its_stored_accuracy_on_fashion_mnist():
    """Needs the optional Debian package dataset-fashion-mnist (root)."""
    from petlkit.model import attach
    from petlkit.train.config import TrainConfig
    from petlkit.train.trainer import Trainer

    model = attach(load_vit(SHIPPED), "linear")
    task = load_task("fashion-mnist")
    score = Trainer(model, task, TrainConfig(eval_batch_size=500), progress=False).evaluate("test")
    assert score == pretrain_info(SHIPPED)["test"]
