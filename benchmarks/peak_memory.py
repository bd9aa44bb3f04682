"""Peak training memory of every method ÷ full fine-tuning: each method trains a few steps in a
fresh process, which reports its peak resident set size (CPU) or peak CUDA memory (GPU).

    python benchmarks/peak_memory.py --model text [--seq 128 --batch 32] [--steps 3]
    python benchmarks/peak_memory.py --model vision [--batch 64]
    python benchmarks/peak_memory.py --peft     # petlkit's LoRA, prefix, prompt vs HF PEFT's
    add --device cuda --bf16 on a GPU (peak CUDA memory allocated, bf16 autocast)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
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
    text_case,
    to_device,
    trained_optimizer,
    vision_case,
)

import petlkit  # noqa: E402

PEFT_PAIRS = ["lora", "prefix", "prompt"]


def peft_model(model, method: str):
    """The same task model with HF PEFT's version of `method` on its encoder."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    configs = {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
        "prefix": PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=10,
                                     prefix_projection=True, encoder_hidden_size=512),
        "prompt": PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=10),
    }  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    model.pooling = "cls"  # PEFT's prompt keeps the prompt positions in the output
    model.encoder = get_peft_model(model.encoder, configs[method])
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def build(args, method: str, library: str, device: str):
    if args.model == "text":
        model, inputs = text_case(args.seq, args.batch or 32)
    else:
        model, inputs = vision_case(args.batch or 64)
    if library == "peft":
        return peft_model(model, method).to(device), inputs
    if method in ("prompt",):
        model.pooling = "cls"  # same pooling as the PEFT side
    return petlkit.attach(model.to(device), method).train(), inputs


def one(args) -> None:
    method, library = args.one.split(":")
    device = args.device
    model, inputs = build(args, method, library, device)
    model.train()
    if args.checkpointing:
        model.model.set_activation_checkpointing(True)
    inputs = to_device(inputs, device)
    labels = torch.zeros(next(iter(inputs.values())).shape[0], dtype=torch.long, device=device)
    opt = trained_optimizer(model)
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            loss = F.cross_entropy(model(**inputs).float(), labels)
        loss.backward()
        opt.step()
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["text", "vision"], default="text")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peft", action="store_true", help="compare with HF PEFT (text)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    add_device_args(parser)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if args.peft:
        runs = [f"{m}:{lib}" for m in PEFT_PAIRS for lib in ("petlkit", "peft")]
        args.model = "text"
    else:
        methods = TEXT_METHODS if args.model == "text" else VISION_METHODS
        runs = [f"{m}:petlkit" for m in methods]
    peaks = {}
    for run in runs:
        cmd = [sys.executable, __file__, "--one", run, "--model", args.model, "--seq",
               str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
               "--device", args.device, *(["--bf16"] if args.bf16 else [])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[run] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    unit = "peak CUDA MiB" if torch.device(args.device).type == "cuda" else "peak RSS MiB"
    if args.peft:
        print(f"| method | petlkit {unit} | PEFT {unit} | petlkit ÷ PEFT |\n|---|---:|---:|---:|")
        for m in PEFT_PAIRS:
            ours, theirs = peaks[f"{m}:petlkit"], peaks[f"{m}:peft"]
            print(f"| {m} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.3f} |")
        return
    full = peaks["full:petlkit"]
    print(f"| method | {unit} | ÷ full FT |\n|---|---:|---:|")
    for run, peak in peaks.items():
        print(f"| {run.split(':')[0]} | {peak:.0f} | {peak / full:.3f} |")


if __name__ == "__main__":
    main()
