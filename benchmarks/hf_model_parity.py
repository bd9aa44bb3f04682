"""MiniLM-L6 as the user's own transformers classifier against petlkit's `build_model` path:
the same data, method, rate, steps and seeds, trained by petlkit's trainer. The two task models
differ only in their heads (transformers' BERT classifier reads the pooler, tanh over [CLS];
petlkit's reads [CLS] directly), so their accuracies should agree within seed noise.

    python benchmarks/hf_model_parity.py [--steps 300 --seeds 0 1 2 --method lora]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

import petlkit
from petlkit.backbones.registry import minilm_path
from petlkit.tasks.registry import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer


def user_model(num_labels: int):
    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=num_labels, local_files_only=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    task = load_task("rotten-tomatoes")
    scores: dict[str, list[float]] = {"build_model": [], "AutoModelForSequenceClassification": []}
    for seed in args.seeds:
        for path in scores:
            torch.manual_seed(seed)
            if path == "build_model":
                built = petlkit.build_model("minilm-l6", task.num_labels, pooling="cls")
                model, tokenizer = built.model, built.tokenizer
            else:
                model, tokenizer = user_model(task.num_labels), built.tokenizer
            petl = petlkit.attach(model, args.method)
            config = TrainConfig(steps=args.steps, batch_size=16, lr=args.lr, seed=seed,
                                 eval_every=args.steps // 3, checkpoint_every=0)  # fmt: skip
            result = Trainer(petl, task, config, tokenizer=tokenizer, progress=False).fit()
            scores[path].append(100 * result["test"][task.metric])
            print(json.dumps({"path": path, "seed": seed, "test": scores[path][-1],
                              "val": result["val"]}), flush=True)  # fmt: skip
    print(f"\n| task model | {args.method} test accuracy, seeds {args.seeds} |\n|---|---:|")
    for path, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {path} | {statistics.mean(values):.1f} ± {spread:.1f} |")


if __name__ == "__main__":
    main()
