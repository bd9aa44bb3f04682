"""A compact text-classification loop: AdamW, cosine schedule with warm-up, dynamic padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from petlkit.data.rotten_tomatoes import TextSplit
from petlkit.model import PetlModel


@dataclass(frozen=True)
class TextTrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_length: int = 64
    seed: int = 0


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Indices for `steps` batches: seeded epoch-wise permutations."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_text(
    model: PetlModel, tokenizer, data: TextSplit, cfg: TextTrainConfig, progress: bool = True
) -> list[float]:
    """Train the model's trainable parameters; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * cfg.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    labels = torch.tensor(data.labels)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train", leave=False)
    for index in _batches(len(data), cfg.batch_size, cfg.steps, cfg.seed):
        inputs = _encode(tokenizer, [data.texts[i] for i in index], cfg.max_length)
        loss = F.cross_entropy(model(**inputs), labels[index])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return losses


@torch.no_grad()
def evaluate_text(
    model: PetlModel, tokenizer, data: TextSplit, batch_size: int = 64, max_length: int = 64
) -> float:
    """Accuracy on `data`."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        inputs = _encode(tokenizer, data.texts[start : start + batch_size], max_length)
        pred = model(**inputs).argmax(-1)
        correct += (pred == torch.tensor(data.labels[start : start + batch_size])).sum().item()
    return correct / len(data)
