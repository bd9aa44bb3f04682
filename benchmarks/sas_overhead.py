"""SaS cost on CPU, measured side by side in one run (a benchmark, never a pass/fail test).

    python benchmarks/sas_overhead.py [--repeats 7]

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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
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


def measure(name: str, model: torch.nn.Module, inputs: dict, repeats: int) -> None:
    labels = torch.zeros(next(iter(inputs.values())).shape[0], dtype=torch.long)
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
        return lambda: F.cross_entropy(m(**inputs), labels).backward()

    def infer(m):
        def run():
            with torch.no_grad():
                m(**inputs)

        return run

    t = median_seconds(
        {"frozen": step(frozen), "sas": step(sas), "plain": infer(plain), "merged": infer(merged)},
        repeats,
    )
    print(
        f"| {name} | {t['frozen'] * 1e3:.0f} ms | {t['sas'] * 1e3:.0f} ms | "
        f"{t['sas'] / t['frozen']:.3f} | {t['plain'] * 1e3:.0f} ms | {t['merged'] * 1e3:.0f} ms | "
        f"{t['merged'] / t['plain']:.3f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, median of "
        f"{args.repeats} interleaved runs"
    )
    print(
        "| model | frozen step | SaS step | SaS ÷ frozen (goal ≤ 1.15) | plain infer | "
        "merged infer | merged ÷ plain (goal ≤ 1.02) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    measure("MiniLM-L6, b32 × 64 tokens", *text_case(), args.repeats)
    measure("ViT-Tiny, b64 × 32 px / patch 4", *vision_case(), args.repeats)


if __name__ == "__main__":
    main()
