"""SaS cost on CPU, measured side by side in one run (a benchmark, never a pass/fail test).

    python benchmarks/sas_overhead.py [--repeats 7] [--device cuda --bf16]

Prints, for real MiniLM-L6 (batch 32, sequence 64) and a ViT-Tiny-shaped model (batch 64,
32 px, patch 4): the SaS training step (forward + backward) ÷ the frozen-backbone limit (the same
forward + backward to the inputs with every weight frozen), and merged inference ÷ plain inference.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cases import (  # noqa: E402
    add_device_args,
    autocast,
    backward_step,
    peak_step_gib,
    sync,
    to_device,
    where,
)
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402
from petlkit.backbones import vit  # noqa: E402


def text_case():
    built = petlkit.build_model("minilm-l6", num_classes=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 64), generator=gen)
    embeddings = built.model.encoder.embeddings
    # "backward to the inputs": make the embedding output require grad in the frozen model
    embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    return built.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vision_case():
    torch.manual_seed(0)
    model = vit("vit_tiny", img_size=32, patch_size=4, num_classes=10)
    return model, {"pixels": torch.randn(64, 3, 32, 32, requires_grad=True)}


def measure(name: str, model: torch.nn.Module, inputs: dict, args) -> None:
    device, amp, repeats = args.device, autocast(args), args.repeats
    model, inputs = model.to(device), to_device(inputs, device)
    labels = torch.zeros(next(iter(inputs.values())).shape[0], dtype=torch.long, device=device)
    frozen = copy.deepcopy(model).train()
    for p in frozen.parameters():
        p.requires_grad_(False)
    sas = petlkit.attach(copy.deepcopy(model), "sas").train()
    with torch.no_grad():  # non-zero parameters, as after training
        for p in sas.methods["default"].parameters():
            p.add_(torch.randn_like(p) * 0.02)
    plain = copy.deepcopy(model).eval()
    merged = copy.deepcopy(sas).eval()
    merged.merge()

    def step(m):
        return backward_step(m, inputs, labels, args)

    def infer(m):
        def run():
            with torch.no_grad(), amp:
                m(**inputs)
            sync(device)

        return run

    fns = {"frozen": step(frozen), "sas": step(sas), "plain": infer(plain), "merged": infer(merged)}
    t = median_seconds(fns, repeats)
    peaks = [peak_step_gib(fns[k], device) for k in ("frozen", "sas")]
    memory = "n/a" if peaks[0] is None else f"{peaks[1]:.2f} / {peaks[0]:.2f}"
    print(
        f"| {name} | {t['frozen'] * 1e3:.1f} ms | {t['sas'] * 1e3:.1f} ms | "
        f"{t['sas'] / t['frozen']:.3f} | {t['plain'] * 1e3:.1f} ms | {t['merged'] * 1e3:.1f} ms | "
        f"{t['merged'] / t['plain']:.3f} | {memory} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    add_device_args(parser)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {where(args)}, bf16 {args.bf16}, median of "
        f"{args.repeats} interleaved runs"
    )
    print(
        "| model | frozen step | SaS step | SaS ÷ frozen (goal ≤ 1.15) | plain infer | "
        "merged infer | merged ÷ plain (goal ≤ 1.02) | peak GiB SaS / frozen |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    measure("MiniLM-L6, b32 × 64 tokens", *text_case(), args)
    measure("ViT-Tiny, b64 × 32 px / patch 4", *vision_case(), args)


if __name__ == "__main__":
    main()
