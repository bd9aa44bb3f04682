"""petlkit's LoRA, prefix and prompt tuning ÷ HF PEFT's, training step time, side by side in one
process (same MiniLM-L6 task model, same targets, ranks and lengths; forward + backward + AdamW).

    python benchmarks/peft_speed.py [--seq 128 --batch 32 --repeats 5] [--device cuda --bf16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cases import (  # noqa: E402
    add_device_args,
    autocast,
    peak_step_gib,
    sync,
    text_case,
    to_device,
    trained_optimizer,
    where,
)
from peak_memory import PEFT_PAIRS, peft_model  # noqa: E402
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_args(parser)
    args = parser.parse_args()
    device, amp = args.device, autocast(args)
    models = {}
    for method in PEFT_PAIRS:
        model, inputs = text_case(args.seq, args.batch)
        model.pooling = "cls"
        models[f"{method}:petlkit"] = petlkit.attach(model.to(device), method).train()
        model, inputs = text_case(args.seq, args.batch)
        models[f"{method}:peft"] = peft_model(model, method).to(device).train()
    inputs = to_device(inputs, device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    optims = {k: trained_optimizer(m) for k, m in models.items()}

    def step(key):
        def run():
            optims[key].zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(models[key](**inputs).float(), labels)
            loss.backward()
            optims[key].step()
            sync(device)

        return run

    fns = {k: step(k) for k in models}
    t = median_seconds(fns, args.repeats)
    peaks = {k: peak_step_gib(fn, device) for k, fn in fns.items()}
    print(f"MiniLM-L6, batch {args.batch} × {args.seq} tokens; torch {torch.__version__}, "
          f"{where(args)}, bf16 {args.bf16}, median of {args.repeats} runs")  # fmt: skip
    print("\n| method | petlkit step | PEFT step | petlkit ÷ PEFT | petlkit peak GiB | PEFT peak "
          "GiB |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for m in PEFT_PAIRS:
        ours, theirs = t[f"{m}:petlkit"], t[f"{m}:peft"]
        mem = [peaks[f"{m}:{lib}"] for lib in ("petlkit", "peft")]
        mem_cells = " | ".join("n/a" if v is None else f"{v:.2f}" for v in mem)
        print(f"| {m} | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms | {ours / theirs:.3f} | "
              f"{mem_cells} |")  # fmt: skip


if __name__ == "__main__":
    main()
