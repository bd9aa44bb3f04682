"""Inputs and models the benchmark scripts share."""

from __future__ import annotations

import torch

import petlkit
from petlkit.backbones import vit

TEXT_METHODS = ["full", "linear", "bitfit", "lora", "adapter", "ssf", "prefix", "prompt", "sas",
                "unipelt", "unipelt-prompt"]  # fmt: skip
VISION_METHODS = ["full", "linear", "bitfit", "lora", "adapter", "ssf", "vpt", "sas"]


def text_case(seq: int = 128, batch: int = 32, backbone: str = "minilm-l6"):
    """(task model, inputs) for a text backbone; inputs are token ids of full length."""
    torch.manual_seed(0)
    model = petlkit.build_model(backbone, num_classes=2).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=gen)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vision_case(batch: int = 64, img: int = 32, patch: int = 4, preset: str = "vit_tiny"):
    torch.manual_seed(0)
    model = vit(preset, img_size=img, patch_size=patch, num_classes=10)
    return model, {"pixels": torch.randn(batch, 3, img, img)}


def frozen_limit(model: torch.nn.Module, inputs: dict):
    """The physical limit of any PETL step: forward + backward to the inputs, nothing trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    key = "pixels" if "pixels" in inputs else None
    if key:
        inputs = dict(inputs, pixels=inputs["pixels"].clone().requires_grad_(True))
    else:  # make the embedding output require grad, so backward runs through every block
        model.encoder.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    return model, inputs


def trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameters a method trains (a tiny lr: the timing, not the result, counts)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
