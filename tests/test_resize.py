"""A pretrained ViT at another input side than its own (`--resize`): the images, the model's
position-embedding grid, the saved run and the bench all agree on the size."""

from __future__ import annotations

import json

import pytest
import torch

from petlkit.bench.presets import PRESETS, narrowed
from petlkit.bench.tasks import TaskCache
from petlkit.cli import main
from petlkit.errors import ConfigError
from petlkit.run import RunSpec, build_for_task, fit_to_backbone, load_run
from petlkit.tasks import load_task

# vit-fmnist: 28 px grey images, patch 7 (a 4 × 4 grid)


def test_resize_sets_the_images_and_the_models_patch_grid():
    task = fit_to_backbone(load_task("digits"), "vit-fmnist", resize=42)
    assert task.image_size == 42 and task.splits["train"].inputs.shape[-2:] == (42, 42)
    spec = RunSpec(backbone="vit-fmnist", method="linear", task="digits", resize=42)
    model = build_for_task(spec, task).model.eval()
    assert model.pos_embed.shape[1] == 1 + 6 * 6  # class token + the resampled 6 × 6 grid
    with torch.no_grad():
        logits = model(task.splits["val"].inputs[:3])
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_no_resize_keeps_the_backbones_own_side():
    assert fit_to_backbone(load_task("digits"), "vit-fmnist").image_size == 28


@pytest.mark.parametrize("resize, message", [(30, "not a multiple of vit-fmnist's patch size 7"),
                                              (0, "positive whole number"),
                                              (-7, "positive whole number")])  # fmt: skip
def test_bad_resize_names_the_problem(resize, message):
    with pytest.raises(ConfigError, match=message):
        spec = RunSpec(backbone="vit-fmnist", method="linear", task="digits", resize=resize)
        spec.build_and_load()


def test_a_resized_run_is_saved_and_scored_at_its_size(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--backbone", "vit-fmnist", "--task", "digits", "--method", "lora",
            "--resize", "42", "--steps", "3", "--batch-size", "8",
            "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["resize"] == 42
    model, spec, _ = load_run(out)
    assert spec.resize == 42 and model.model.pos_embed.shape[1] == 1 + 6 * 6
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "test"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test"] == json.loads((out / "results.json").read_text())["test"]


def test_the_bench_trains_at_the_presets_size():
    preset = narrowed(PRESETS["vision-here"], tasks=["mnist-5k"], resize=42)
    assert preset.resize == 42
    assert TaskCache(preset, None).get("mnist-5k").image_size == 42
    assert TaskCache(PRESETS["vision-here"], None).get("mnist-5k").image_size == 28


def test_the_cpu_vit_b16_preset_is_resized_and_small():
    preset = PRESETS["vision-b16-cpu"]
    assert preset.backbone == "clip-vit-b16" and preset.resize == 48 and 48 % 16 == 0
    assert set(preset.methods) == {"linear", "lora", "sas"}
    assert set(preset.tasks) == set(PRESETS["vision-here"].tasks)  # both mini-VTAB tasks
    assert preset.shots == (2, 8) and preset.steps_for(2) == preset.steps_for(8) == 100
    assert PRESETS["vision-b16"].resize is None  # on a GPU: CLIP's own 224 px
