"""Every method of ours on a real decoder LLM: SmolLM2-135M-Instruct (LlamaForCausalLM, 30
layers, GQA 9/3 heads; `make assets-llm`), language modelling on Rotten Tomatoes snippets.

Per method: validation loss (mean token NLL on held-out snippets) before and after `--steps`
AdamW steps at one rate; greedy `generate()` with the KV cache on and off (must agree); for
mergeable methods, the merged model's tokens against the unmerged model's. A check that the
methods learn and generate on a real LLM, not a ranking (one rate, one seed, a short schedule).
Records go to `--output`/results.jsonl, one line per method; a rerun skips finished methods.

    python benchmarks/smollm2_methods.py [--steps 100 --batch 8 --seq 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import petlkit
from petlkit.backbones.gguf import load_causal_lm
from petlkit.data.rotten_tomatoes import load_rotten_tomatoes

METHODS = {  # config, learning rate
    "lora": ({"r": 8, "alpha": 16}, 1e-3),
    "sas": ({}, 1e-3),
    "unipelt": ({}, 1e-3),
    "unipelt-prompt": ({}, 1e-3),
    "prefix": ({}, 1e-4),  # at 1e-3 its validation loss rose (results/checks/smollm2-prefix-rates)
    "prompt": ({}, 3e-3),
}
PROMPTS = ["The movie was", "A gripping thriller that"]


def batches(tokenizer, texts: list[str], batch: int, seq: int):
    tokenizer.padding_side = "right"
    for start in range(0, len(texts) - batch + 1, batch):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding="max_length",
                        truncation=True, max_length=seq)  # fmt: skip
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield {**enc, "labels": labels}


@torch.no_grad()
def validation_loss(model, val: list[dict]) -> float:
    model.eval()
    losses = [model(**b).loss.item() for b in val]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy(model, tokenizer, use_cache: bool = True) -> list[str]:
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last real token
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def run(method: str, args, data, tokenizer) -> dict:
    fields, lr = METHODS[method]
    lr = args.lr or lr
    model, _ = load_causal_lm("smollm2-135m")
    petl = petlkit.attach(model, method, **fields)
    train, val = data
    before = validation_loss(petl, val)
    params = [p for p in petl.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    petl.train()
    start = time.perf_counter()
    for step, batch in enumerate(train[: args.steps]):
        opt.zero_grad()
        petl(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"  {method} step {step} loss {petl(**batch).loss.item():.3f}", flush=True)
    seconds = (time.perf_counter() - start) / args.steps
    after = validation_loss(petl, val)
    cached, uncached = greedy(petl, tokenizer, True), greedy(petl, tokenizer, False)
    record = {"method": method, "lr": lr, "steps": args.steps, "batch": args.batch,
              "seq": args.seq, "trainable": petl.trainable_parameters().trainable,
              "val_loss_before": round(before, 4), "val_loss_after": round(after, 4),
              "seconds_per_step": round(seconds, 2), "generated": cached,
              "cache_on_equals_off": cached == uncached}  # fmt: skip
    if petl.methods["default"].merge_refusal is None:
        petl.merge()
        record["merged_equals_unmerged"] = greedy(petl, tokenizer) == cached
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--val", type=int, default=64, help="validation snippets")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--lr", type=float, help="one rate for the methods run (default: theirs)")
    parser.add_argument("--output", default="results/checks/smollm2-methods")
    args = parser.parse_args()
    torch.manual_seed(0)
    splits = load_rotten_tomatoes()
    _, tokenizer = load_causal_lm("smollm2-135m")
    texts = splits["train"].texts[: args.steps * args.batch]
    val = splits["val"].texts[: args.val]
    data = (list(batches(tokenizer, texts, args.batch, args.seq)),
            list(batches(tokenizer, val, args.batch, args.seq)))  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "results.jsonl"
    done = {json.loads(line)["method"] for line in records.open()} if records.exists() else set()
    for method in args.methods:
        if method in done:
            continue
        print(f"{method}: training", flush=True)
        torch.manual_seed(0)
        record = run(method, args, data, tokenizer)
        with records.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    print("| method | trainable | val loss before | after | s/step | cache on = off | "
          "merged = unmerged |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---|")
    for line in records.open():
        r = json.loads(line)
        merged = r.get("merged_equals_unmerged", "not mergeable")
        print(f"| {r['method']} | {r['trainable']:,} | {r['val_loss_before']:.3f} | "
              f"{r['val_loss_after']:.3f} | {r['seconds_per_step']} | {r['cache_on_equals_off']} "
              f"| {merged} |")  # fmt: skip


if __name__ == "__main__":
    main()
