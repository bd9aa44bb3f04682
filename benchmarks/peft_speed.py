"""petlkit's LoRA, prefix and prompt tuning ÷ HF PEFT's, training step time, side by side in one
process (same MiniLM-L6 task model, same targets, ranks and lengths; forward + backward + AdamW).

    python benchmarks/peft_speed.py [--seq 128 --batch 32 --repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cases import text_case, trained_optimizer  # noqa: E402
from peak_memory import PEFT_PAIRS, peft_model  # noqa: E402
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models = {}
    for method in PEFT_PAIRS:
        model, inputs = text_case(args.seq, args.batch)
        model.pooling = "cls"
        models[f"{method}:petlkit"] = petlkit.attach(model, method).train()
        model, inputs = text_case(args.seq, args.batch)
        models[f"{method}:peft"] = peft_model(model, method).train()
    labels = torch.zeros(args.batch, dtype=torch.long)
    optims = {k: trained_optimizer(m) for k, m in models.items()}

    def step(key):
        def run():
            optims[key].zero_grad(set_to_none=True)
            F.cross_entropy(models[key](**inputs), labels).backward()
            optims[key].step()

        return run

    t = median_seconds({k: step(k) for k in models}, args.repeats)
    threads = torch.get_num_threads()
    print(f"MiniLM-L6, batch {args.batch} × {args.seq} tokens; torch {torch.__version__}, "
          f"{threads} threads, CPU, median of {args.repeats} interleaved runs")  # fmt: skip
    print("\n| method | petlkit step | PEFT step | petlkit ÷ PEFT |\n|---|---:|---:|---:|")
    for m in PEFT_PAIRS:
        ours, theirs = t[f"{m}:petlkit"], t[f"{m}:peft"]
        print(f"| {m} | {ours * 1e3:.0f} ms | {theirs * 1e3:.0f} ms | {ours / theirs:.3f} |")


if __name__ == "__main__":
    main()
