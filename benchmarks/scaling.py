"""How each method's step ÷ the frozen limit changes as the sequence, the image or the backbone
grows (the overhead should stay flat or shrink). Side by side in one process per setting.

    python benchmarks/scaling.py [--repeats 3] [--wide bert-base-shape | <transformers folder>]
                                 [--device cuda --bf16]

Text: MiniLM-L6 at 32, 64 and 128 tokens (batch 32), then MiniLM-L6 vs a BERT-base-sized encoder
at batch 8 × 64 tokens (`bert-base-shape`: random weights, the same compute as BERT-base; pass
an MPNet-base folder with --wide to time that instead, without prefix-based methods). Vision:
ViT-Tiny at 32 and 64 px (patch 4: 65 and 257 tokens), batch 32.
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
    backward_step,
    frozen_limit,
    text_case,
    to_device,
    vision_case,
    where,
)
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402

METHODS = ["lora", "sas", "unipelt-prompt"]
VISION = ["lora", "sas", "vpt"]


def ratios(model, inputs, methods, args) -> dict[str, float]:
    device = args.device
    model, inputs = model.to(device), to_device(inputs, device)
    labels = torch.zeros(next(iter(inputs.values())).shape[0], dtype=torch.long, device=device)
    frozen, frozen_inputs = frozen_limit(copy.deepcopy(model), inputs)

    fns = {"frozen": backward_step(frozen, frozen_inputs, labels, args)}
    for m in methods:
        fns[m] = backward_step(
            petlkit.attach(copy.deepcopy(model), m).train(), inputs, labels, args
        )
    t = median_seconds(fns, args.repeats, warmup=1)
    return {"frozen_ms": t["frozen"] * 1e3, **{m: t[m] / t["frozen"] for m in methods}}


def row(label: str, r: dict, methods) -> None:
    cells = " | ".join(f"{r[m]:.3f}" for m in methods)
    print(f"| {label} | {r['frozen_ms']:.0f} ms | {cells} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide", default="bert-base-shape")
    add_device_args(parser)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {where(args)}, bf16 {args.bf16}, median of "
          f"{args.repeats}; cells: step (forward + backward) ÷ the frozen limit")  # fmt: skip
    header = " | ".join(METHODS)
    print(f"\n| text setting | frozen limit | {header} |\n|---|---:|" + "---:|" * len(METHODS))
    for seq in (32, 64, 128):
        row(f"MiniLM-L6, 32 × {seq}", ratios(*text_case(seq, 32), METHODS, args), METHODS)
    wide_methods = METHODS if args.wide == "bert-base-shape" else ["lora", "sas"]
    for name in ("minilm-l6", args.wide):
        r = ratios(*text_case(64, 8, backbone=name), wide_methods, args)
        row(f"{name}, 8 × 64", {**{m: float("nan") for m in METHODS}, **r}, METHODS)
    header = " | ".join(VISION)
    print(f"\n| vision setting | frozen limit | {header} |\n|---|---:|" + "---:|" * len(VISION))
    for img in (32, 64):
        r = ratios(*vision_case(32, img), VISION, args)
        row(f"ViT-Tiny, 32 × {img} px ({(img // 4) ** 2 + 1} tokens)", r, VISION)


if __name__ == "__main__":
    main()
