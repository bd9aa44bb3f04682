"""Batches, loss and scores of language-model tasks (tasks/generation.py) for the trainer.

The loss of a step is the mean negative log-likelihood over every completion token of the global
batch (the prompt and padding masked), however the batch is split into processes and
accumulation steps, so one process and several train alike. Packing (`packing=True`) joins
examples into rows of `max_length` tokens whose position ids restart at every example;
transformers then gives each example its own causal attention (no token sees another example),
when the forward keeps no cache (`use_cache=False`, which the trainer passes).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from petlkit.errors import PetlError
from petlkit.tasks.generation import Example

IGNORE = -100  # label of a token the loss does not count


def tokenize(example: Example, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: labels copy the completion's ids and mask the prompt.
    Too long: the prompt loses its start first, then the completion its end."""
    prompt, completion = example.render(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]  # a corpus text starts where a document starts
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not example.messages and tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]  # the model learns where to stop
    answer = answer[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer) - max_length) :]
    return prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer


def padded(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded input ids, attention mask and labels (padding masked)."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (tokens, targets) in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(targets)] = torch.tensor(targets)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed(sequences: Sequence[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> dict:
    """Examples joined into rows of at most `max_length` tokens (in order, a new row when the next
    one does not fit); position ids restart at each example, padding is masked in the labels and
    gets positions of its own run, so it is a separate (ignored) document."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    for seq in sequences:
        if rows[-1] and sum(len(s[0]) for s in rows[-1]) + len(seq[0]) > max_length:
            rows.append([])
        rows[-1].append(seq)
    width = max(sum(len(s[0]) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for tokens, targets in row:
            n = len(tokens)
            ids[r, at : at + n] = torch.tensor(tokens)
            labels[r, at : at + n] = torch.tensor(targets)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def completion_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood, number of tokens) of the unmasked labels; token t is
    predicted by position t − 1."""
    targets = labels[:, 1:]
    counted = targets != IGNORE
    logits = logits[:, :-1][counted].float()
    nll = F.cross_entropy(logits, targets[counted], reduction="sum")
    return nll, counted.sum()


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: what exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def prompt_batch(tokenizer, prompts: list[str], max_length: int | None, device) -> dict:
    """Prompts as a decoder's generate() takes them: ids and mask only (a tokenizer's token type
    ids mean nothing to a decoder)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=max_length is not None,
                    max_length=max_length)  # fmt: skip
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def check_packing(model) -> None:
    """Packing relies on position ids to keep examples apart; methods that add tokens in front
    of the sequence (prompts) or keys every query sees (prefixes) would join them again."""
    from petlkit.methods.prefix import Prefix
    from petlkit.methods.prompt import Prompt

    adds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Prefix | Prompt)})
    if adds:
        raise PetlError(f"packing keeps examples apart by their position ids, which {adds} "
                        "tokens do not follow; train these methods with packing off")  # fmt: skip


def _logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batches(examples: Sequence[Example], size: int):
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def _forwards(model, seqs, pad_id: int, batch_size: int, device, autocast):
    """(labels, logits) of tokenized examples, one padded batch at a time."""
    for chunk in _batches(seqs, batch_size):
        batch = {k: v.to(device) for k, v in padded(chunk, pad_id).items()}
        with autocast():
            logits = _logits(model, batch)
        yield batch["labels"], logits


def _perplexity(passes, each=None) -> float:
    """exp(mean completion-token NLL) over `passes` ((labels, logits) pairs); `each(labels,
    logits)` is called on every pair too."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for labels, logits in passes:
        nll, n = completion_nll(logits, labels)
        total += nll.double().cpu()
        count += int(n)
        if each is not None:
            each(labels, logits)
    return float(torch.exp(total / max(count, 1)))


@torch.no_grad()
def perplexity(model, examples, tokenizer, max_length: int, batch_size: int, device, autocast):
    """exp(mean completion-token NLL) over `examples`."""
    seqs = [tokenize(e, tokenizer, max_length) for e in examples]
    return _perplexity(_forwards(model, seqs, tokenizer.pad_token_id, batch_size, device, autocast))


@torch.no_grad()
def verbalised_choice(model, examples, words, tokenizer, max_length, batch_size, device, autocast):
    """For each example, the index of the label word its prompt makes most likely (the summed
    log-probability of the word's tokens)."""
    choices = []
    for chunk in _batches(examples, max(1, batch_size // len(words))):
        candidates = [Example(w, e.prompt, e.messages[:-1] + (("assistant", w),) if e.messages
                              else ()) for e in chunk for w in words]  # fmt: skip
        seqs = [_without_stop(tokenize(c, tokenizer, max_length), tokenizer) for c in candidates]
        batch = {k: v.to(device) for k, v in padded(seqs, tokenizer.pad_token_id).items()}
        with autocast():
            logits = _logits(model, batch)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch["labels"][:, 1:]
        counted = targets != IGNORE
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * counted).sum(-1).view(len(chunk), len(words))
        choices.append(scores.argmax(-1).cpu())
    return torch.cat(choices)


@torch.no_grad()
def label_scores(model, examples, words, tokenizer, max_length, batch_size, device, autocast):
    """(`verbalised_choice`, `perplexity`) of a label-word task. Where every label word is one
    token and each example's prompt is the one its candidates are scored after, both come from
    one forward of each example: the completion's NLL, and at the prompt's last position the
    log-probabilities of the words' tokens (the word's score, as `verbalised_choice` sums it);
    a third of the model passes of scoring them apart. Otherwise, the two passes."""
    gold = [tokenize(e, tokenizer, max_length) for e in examples]
    passes = _forwards(model, gold, tokenizer.pad_token_id, batch_size, device, autocast)
    tokens = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    one_pass = all(len(t) == 1 for t in tokens)
    if not (one_pass and _prompts_match(examples, words, gold, tokenizer, max_length)):
        args = (tokenizer, max_length, batch_size, device, autocast)
        return verbalised_choice(model, examples, words, *args), _perplexity(passes)
    word_ids = torch.tensor([t[0] for t in tokens], device=device)
    choices = []

    def choose(labels: torch.Tensor, logits: torch.Tensor) -> None:
        last = (labels != IGNORE).int().argmax(-1) - 1  # the prompt's last token
        logp = torch.log_softmax(
            logits[torch.arange(len(last), device=last.device), last].float(), -1
        )
        choices.append(logp[:, word_ids].argmax(-1).cpu())

    ppl = _perplexity(passes, choose)  # fills `choices`
    return torch.cat(choices), ppl


def _prompts_match(examples, words, gold, tokenizer, max_length: int) -> bool:
    """Each example's tokens, up to its completion, are those its first candidate word is scored
    after (not so for a chat rendering, or where a longer completion cut the prompt shorter)."""
    for example, (ids, labels) in zip(examples, gold, strict=True):
        prompt = labels.count(IGNORE)  # the prompt's tokens: the masked ones, before the rest
        candidate, _ = _without_stop(tokenize(Example(words[0], example.prompt), tokenizer,
                                              max_length), tokenizer)  # fmt: skip
        if prompt == 0 or candidate[:-1] != ids[:prompt]:
            return False
    return True


def _without_stop(seq: tuple[list[int], list[int]], tokenizer) -> tuple[list[int], list[int]]:
    ids, labels = seq
    if ids and ids[-1] == tokenizer.eos_token_id and labels[-1] != IGNORE:
        return ids[:-1], labels[:-1]
    return ids, labels


@torch.no_grad()
def exact_match(model, examples, tokenizer, max_length, batch_size, device, autocast) -> float:
    """The share of examples whose greedy continuation, normalised, starts with the normalised
    completion (a label word, a short answer)."""
    hits = 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from each prompt's last token
    try:
        for chunk in _batches(examples, batch_size):
            rendered = [e.render(tokenizer) for e in chunk]  # (prompt, completion) each
            prompts = [prompt for prompt, _ in rendered]
            answers = [normalise(completion) for _, completion in rendered]
            longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
            enc = prompt_batch(tokenizer, prompts, max_length, device)
            with autocast():
                out = model.generate(**enc, max_new_tokens=longest + 1, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :],
                                           skip_special_tokens=True)  # fmt: skip
            for text, answer in zip(texts, answers, strict=True):
                words = normalise(text).split()[: len(answer.split())]
                hits += int(" ".join(words) == answer)
    finally:
        tokenizer.padding_side = side
    return hits / len(examples)
