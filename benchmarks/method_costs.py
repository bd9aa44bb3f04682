"""Training step and inference cost of every method, measured side by side in one process.

    python benchmarks/method_costs.py --model text   [--seq 128 --batch 32] [--repeats 5]
    python benchmarks/method_costs.py --model vision [--batch 64]
    python benchmarks/method_costs.py --model vision --preset vit_base --img 224 --patch 16 --bf16
        (the GPU check: a ViT-B/16-shaped model, random weights, batch 64, bf16 autocast)
    --folded adds a row per mergeable method trained folded (methods/folding.py), timed in the
    same interleaved run as its unfolded row.

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
from cases import (  # noqa: E402
    TEXT_METHODS,
    VISION_METHODS,
    add_device_args,
    autocast,
    frozen_limit,
    peak_step_gib,
    sync,
    text_case,
    to_device,
    trained_optimizer,
    vision_case,
    where,
)
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
    parser.add_argument("--preset", default="vit_tiny")
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--folded", action="store_true", help="also time the folded forms")
    add_device_args(parser)
    args = parser.parse_args()
    device = args.device
    if args.model == "text":
        batch = args.batch or 32
        model, inputs = text_case(args.seq, batch)
        methods, what = TEXT_METHODS, f"MiniLM-L6, batch {batch} × {args.seq} tokens"
    else:
        batch = args.batch or 64
        model, inputs = vision_case(batch, args.img, args.patch, args.preset)
        methods = VISION_METHODS
        what = f"{args.preset}, batch {batch} × {args.img} px / patch {args.patch}"
    model = model.to(device)  # methods attach to the model where it is (placement rule)
    inputs = to_device(inputs, device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    amp = autocast(args)
    frozen, frozen_inputs = frozen_limit(copy.deepcopy(model), inputs)
    models = {m: trained(model, m) for m in methods}
    if args.folded:
        for m in list(methods):
            if models[m].fold_refusal() is None:
                folded = copy.deepcopy(models[m])
                folded.set_folded(True)
                models[f"{m} folded"] = folded
    rows = list(models)
    optims = {m: trained_optimizer(pm) for m, pm in models.items()}

    def step(m):
        def run():
            optims[m].zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(models[m](**inputs).float(), labels)
            loss.backward()
            optims[m].step()
            sync(device)

        return run

    def frozen_step():
        with amp:
            loss = F.cross_entropy(frozen(**frozen_inputs).float(), labels)
        loss.backward()
        sync(device)

    fns = {"frozen": frozen_step}
    fns.update({m: step(m) for m in rows})
    t = median_seconds(fns, args.repeats)
    peaks = {name: peak_step_gib(fn, device) for name, fn in fns.items()}

    plain = copy.deepcopy(model).eval()
    infer_models = {"plain": plain}
    for m, pm in models.items():
        if m in ("full", "linear") or m.endswith(" folded"):
            continue
        infer_models[m] = copy.deepcopy(pm).eval()
        if pm.methods["default"].merge_refusal is None:
            merged = copy.deepcopy(pm).eval()
            merged.merge()
            infer_models[f"{m} merged"] = merged

    def infer(pm):
        def run():
            with torch.no_grad(), amp:
                pm(**inputs)
            sync(device)

        return run

    ti = median_seconds({k: infer(v) for k, v in infer_models.items()}, args.repeats)
    print(f"{what}; torch {torch.__version__}, {where(args)}, bf16 {args.bf16}, median of "
          f"{args.repeats} interleaved runs")  # fmt: skip

    def gib(name):  # peak CUDA memory of one step, and ÷ the frozen step's
        if peaks[name] is None:
            return "n/a | n/a | "
        return f"{peaks[name]:.2f} | {peaks[name] / peaks['frozen']:.2f} | "

    print("\n| method | trainable | step | ÷ frozen limit | ÷ full FT | peak GiB | ÷ frozen | "
          "infer ÷ plain | merged ÷ plain |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| frozen limit | 0 | {t['frozen'] * 1e3:.1f} ms | 1.000 | "
          f"{t['frozen'] / t['full']:.3f} | {gib('frozen')}| |")  # fmt: skip
    for m in rows:
        count = models[m].trainable_parameters().trainable
        unmerged = f"{ti[m] / ti['plain']:.3f}" if m in ti else ""
        merged = f"{ti[m + ' merged'] / ti['plain']:.3f}" if m + " merged" in ti else ""
        print(f"| {m} | {count:,} | {t[m] * 1e3:.1f} ms | {t[m] / t['frozen']:.3f} | "
              f"{t[m] / t['full']:.3f} | {gib(m)}{unmerged} | {merged} |")  # fmt: skip


if __name__ == "__main__":
    main()
