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


# -- device, autocast and memory: one place for every benchmark script ---------------------------
def add_device_args(parser) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"where to run (default {default})")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as on a GPU)")


def autocast(args):
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def to_device(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def where(args) -> str:
    """The device in words, for the table's caption."""
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(args.device))
    return f"{torch.get_num_threads()}-thread CPU"


def backward_step(model, inputs: dict, labels: torch.Tensor, args):
    """A callable running one forward (autocast as asked) + backward, synchronised."""
    import torch.nn.functional as F

    def run() -> None:
        with autocast(args):
            loss = F.cross_entropy(model(**inputs).float(), labels)
        loss.backward()
        sync(args.device)

    return run


def peak_step_gib(run, device: str) -> float | None:
    """CUDA memory allocated during one call of `run` at its peak (GiB), None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30
