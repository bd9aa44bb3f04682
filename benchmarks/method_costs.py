"""Training step and inference cost of every method, measured side by side in one process.

    python benchmarks/method_costs.py --model text   [--seq 128 --batch 32] [--repeats 5]
    python benchmarks/method_costs.py --model vision [--batch 64]

A step is forward + backward + AdamW update of the trained parameters. Ratios: ÷ the frozen
limit (forward + backward to the inputs, all weights frozen; no PETL step can be cheaper), and
÷ full fine-tuning. Inference: unmerged ÷ plain backbone, and merged ÷ plain for mergeable
methods. A benchmark, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cases import TEXT_METHODS, VISION_METHODS, frozen_limit, text_case, vision_case  # noqa: E402
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402


def trained(model, method):
    petl = petlkit.attach(copy.deepcopy(model), method).train()
    with torch.no_grad():  # non-zero updates, as after training
        for p in petl.methods["default"].trainable(petl.model).values():
            if method != "full":
                p.add_(torch.randn_like(p) * 0.01)
    return petl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["text", "vision"], default="text")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=0, help="default: 32 text, 64 vision")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model == "text":
        batch = args.batch or 32
        model, inputs = text_case(args.seq, batch)
        methods, what = TEXT_METHODS, f"MiniLM-L6, batch {batch} × {args.seq} tokens"
    else:
        batch = args.batch or 64
        model, inputs = vision_case(batch)
        methods, what = VISION_METHODS, f"ViT-Tiny, batch {batch} × 32 px / patch 4"
    labels = torch.zeros(batch, dtype=torch.long)
    frozen, frozen_inputs = frozen_limit(copy.deepcopy(model), inputs)
    models = {m: trained(model, m) for m in methods}
    optims = {
        m: torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-6)
        for m, pm in models.items()
    }

    def step(m):
        def run():
            optims[m].zero_grad(set_to_none=True)
            F.cross_entropy(models[m](**inputs), labels).backward()
            optims[m].step()

        return run

    fns = {"frozen": lambda: F.cross_entropy(frozen(**frozen_inputs), labels).backward()}
    fns.update({m: step(m) for m in methods})
    t = median_seconds(fns, args.repeats)

    plain = copy.deepcopy(model).eval()
    infer_models = {"plain": plain}
    for m, pm in models.items():
        if m in ("full", "linear"):
            continue
        infer_models[m] = copy.deepcopy(pm).eval()
        if pm.methods["default"].merge_refusal is None:
            merged = copy.deepcopy(pm).eval()
            merged.merge()
            infer_models[f"{m} merged"] = merged

    def infer(pm):
        def run():
            with torch.no_grad():
                pm(**inputs)

        return run

    ti = median_seconds({k: infer(v) for k, v in infer_models.items()}, args.repeats)
    print(f"{what}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, median of "
          f"{args.repeats} interleaved runs")  # fmt: skip
    print("\n| method | trainable | step | ÷ frozen limit | ÷ full FT | infer ÷ plain | "
          "merged ÷ plain |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| frozen limit | 0 | {t['frozen'] * 1e3:.0f} ms | 1.000 | "
          f"{t['frozen'] / t['full']:.3f} | | |")  # fmt: skip
    for m in methods:
        count = models[m].trainable_parameters().trainable
        unmerged = f"{ti[m] / ti['plain']:.3f}" if m in ti else ""
        merged = f"{ti[m + ' merged'] / ti['plain']:.3f}" if m + " merged" in ti else ""
        print(f"| {m} | {count:,} | {t[m] * 1e3:.0f} ms | {t[m] / t['frozen']:.3f} | "
              f"{t[m] / t['full']:.3f} | {unmerged} | {merged} |")  # fmt: skip


if __name__ == "__main__":
    main()
