"""petlkit's training step ÷ HF PEFT's on the real SmolLM2-135M (`make assets-llm`): LoRA r 8 on
q and v, the same batch of Rotten Tomatoes snippets (8 × 64 tokens), the model's own loss,
AdamW; steps interleaved in one process, median of `--repeats`. petlkit's step computes the
trainer's loss (mean NLL over the batch's label tokens), PEFT's the model's own, the same number
(`tests/test_peft_step_parity.py` checks whole training runs against each other).

    python benchmarks/peft_step_smollm2.py [--batch 8 --seq 64 --repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

import petlkit  # noqa: E402
from petlkit.backbones.gguf import load_causal_lm  # noqa: E402
from petlkit.data.rotten_tomatoes import load_rotten_tomatoes  # noqa: E402
from petlkit.train import language_model as lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base, tokenizer = load_causal_lm("smollm2-135m")
    texts = load_rotten_tomatoes()["train"].texts[: args.batch]
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                    max_length=args.seq)  # fmt: skip
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, lm.IGNORE)

    ours = petlkit.attach(base, "lora", r=8, alpha=16).train()
    theirs_base, _ = load_causal_lm("smollm2-135m")
    theirs = get_peft_model(
        theirs_base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ).train()
    optims = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
              for name, m in (("petlkit", ours), ("peft", theirs))}  # fmt: skip

    def petlkit_step():
        logits = ours(**inputs).logits
        nll, count = lm.completion_nll(logits, labels)
        (nll / count).backward()
        optims["petlkit"].step()
        optims["petlkit"].zero_grad(set_to_none=True)

    def peft_step():
        theirs(**inputs, labels=labels).loss.backward()
        optims["peft"].step()
        optims["peft"].zero_grad(set_to_none=True)

    times = median_seconds({"petlkit": petlkit_step, "peft": peft_step}, args.repeats)
    print(
        f"SmolLM2-135M, LoRA r 8 on q, v, batch {args.batch} × {args.seq} tokens, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    for name, seconds in times.items():
        print(f"  {name:8s} {seconds:.3f} s a step")
    print(f"  petlkit ÷ PEFT: {times['petlkit'] / times['peft']:.3f}")


if __name__ == "__main__":
    main()
