"""Activation checkpointing's trade-off: training step time and the activation memory kept for
backward, with and without it, per method, in one process (time interleaved). Memory: the bytes
of the tensors autograd saves for backward (distinct storages, counted with
torch.autograd.graph.saved_tensors_hooks: the same on any device), and on a GPU the peak CUDA
memory allocated during the step.

    python benchmarks/checkpointing.py [--model vision|text] [--repeats 5] [--device cuda --bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cases import (  # noqa: E402
    add_device_args,
    autocast,
    backward_step,
    peak_step_gib,
    sync,
    text_case,
    to_device,
    vision_case,
    where,
)

import petlkit  # noqa: E402

METHODS = ["lora", "sas", "full"]


def saved_mib(petl, inputs, labels, amp) -> float:
    """MiB of the tensors autograd keeps for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss = F.cross_entropy(petl(**inputs).float(), labels)
    loss.backward()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["text", "vision"], default="vision")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_args(parser)
    args = parser.parse_args()
    model, inputs = text_case(128, args.batch) if args.model == "text" else vision_case(args.batch)
    model, inputs = model.to(args.device), to_device(inputs, args.device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    amp = autocast(args)
    print(f"{args.model} (MiniLM-L6 b×128 tokens / ViT-Tiny 32 px), batch {args.batch}; torch "
          f"{torch.__version__}, {where(args)}, bf16 {args.bf16}")  # fmt: skip
    print("\n| method | step | with checkpointing | time × | saved for backward | with "
          "checkpointing | memory × | peak CUDA GiB (off / on) |\n|---|---:|---:|---:|---:|---:|"
          "---:|---:|")  # fmt: skip
    for method in METHODS:
        models = {}
        for on in (False, True):
            petl = petlkit.attach(copy.deepcopy(model), method).train()
            petl.model.set_activation_checkpointing(on)
            models[on] = petl
        times: dict[bool, list[float]] = {False: [], True: []}
        for step in range(args.repeats + 1):
            for on, petl in models.items():
                start = time.perf_counter()
                with amp:
                    loss = F.cross_entropy(petl(**inputs).float(), labels)
                loss.backward()
                sync(args.device)
                if step:
                    times[on].append(time.perf_counter() - start)
        t = {on: statistics.median(v) for on, v in times.items()}
        m = {on: saved_mib(p, inputs, labels, amp) for on, p in models.items()}
        cuda = [
            peak_step_gib(backward_step(p, inputs, labels, args), args.device)
            for p in models.values()
        ]
        cuda_cell = "n/a" if cuda[0] is None else f"{cuda[0]:.2f} / {cuda[1]:.2f}"
        print(f"| {method} | {t[False] * 1e3:.0f} ms | {t[True] * 1e3:.0f} ms | "
              f"{t[True] / t[False]:.2f} | {m[False]:.0f} MiB | {m[True]:.0f} MiB | "
              f"{m[True] / m[False]:.2f} | {cuda_cell} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
