"""The same training as PEFT: from the same LoRA weights (a PEFT folder imported), petlkit's
trainer on a language-model task and a plain PEFT + torch loop fed the same batches (the model's
own loss, AdamW with weight decay, clipping, the cosine schedule with warm-up) log the same loss
at every step and end with the same LoRA weights."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    get_cosine_schedule_with_warmup,
)

from petlkit.backbones.registry import minilm_path
from petlkit.interop.peft import import_peft_lora
from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer
from tests.helpers import tiny_llama

CONFIG = TrainConfig(
    steps=6,
    batch_size=4,
    lr=5e-3,
    eval_every=0,
    checkpoint_every=0,
    max_length=24,
    warmup_ratio=0.34,
    weight_decay=0.01,
    max_grad_norm=0.5,
)


def _base() -> LlamaForCausalLM:
    return tiny_llama()


def test_petlkit_trains_a_peft_lora_step_for_step_as_peft_does(tmp_path):
    rows = [{"prompt": f"question {i} is", "completion": " answer" * (1 + i % 3)}
            for i in range(10)]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("text-generation", data)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)

    torch.manual_seed(1)
    peft = get_peft_model(
        _base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # a LoRA that has trained already: B is not zero
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft.save_pretrained(tmp_path / "peft")

    ours = import_peft_lora(_base(), tmp_path / "peft")
    trainer = Trainer(ours, task, CONFIG, tmp_path / "run", tokenizer, progress=False)
    batches = [trainer.encode(task.splits["train"], trainer.global_batch(step), True)
               for step in range(CONFIG.steps)]  # fmt: skip
    trainer.fit()
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl")
              .read_text().splitlines()]  # fmt: skip

    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=CONFIG.lr, weight_decay=CONFIG.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(CONFIG.warmup_ratio * CONFIG.steps),
                                               CONFIG.steps)  # fmt: skip
    peft.train()
    losses = []
    for inputs, labels in batches:
        loss = peft(**inputs, labels=labels).loss  # transformers' own shifted, masked mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CONFIG.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert len(logged) == CONFIG.steps and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    theirs = {n.replace(".default", ""): p for n, p in peft.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(mine) == len(theirs) == 8
    for name, value in mine.items():
        layer = name.split("layers.")[1].split(".")[0]
        proj = "q_proj" if "q_proj" in name else "v_proj"
        part = name.rsplit(".", 1)[1]  # lora_A, lora_B (petlkit's B: one segment in front)
        match = [v for k, v in theirs.items() if f"layers.{layer}." in k and proj in k
                 and part in k]  # fmt: skip
        assert len(match) == 1, name
        expected = match[0].detach()
        torch.testing.assert_close(value.detach().reshape(expected.shape), expected, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
