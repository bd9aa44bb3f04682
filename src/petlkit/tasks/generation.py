"""Language-model tasks: every example is a prompt and its completion, and training counts the
loss of the completion's tokens only (the prompt and the padding are masked).

From your files (`text-generation`, `--data-dir`): `train`, `val` (or `validation`, `dev`) and,
optionally, `test`, each JSONL or CSV with `prompt` and `completion` columns, or (JSONL) a
`messages` list of `{"role", "content"}` objects rendered with the tokenizer's chat template (the
last message, the assistant's, is the completion). Scored by perplexity of the completions.

Built in, from data the project installs:
- `sentiment-gen`: Rotten Tomatoes snippets as generation: `Review: <snippet>\\nSentiment:` →
  ` positive` / ` negative`; scored by the accuracy of the verbalised label (the more likely of
  the two words), the exact match of the greedy generation, and perplexity.
- `lm-products`: language modelling on product-review sentences (vaderSentiment's Amazon
  snippets, a domain the LLM did not specialise in); scored by perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from petlkit.errors import PetlError
from petlkit.tasks.base import Split, Task

ROLES = ("system", "user", "assistant")
SENTIMENT_WORDS = (" negative", " positive")  # Rotten Tomatoes' class ids 0 (rotten), 1 (fresh)
SENTIMENT_PROMPT = "Review: {text}\nSentiment:"


@dataclass(frozen=True)
class Example:
    """One prompt and its completion; a chat example keeps its messages (rendered with the
    tokenizer's template when batches are made, since the template belongs to the tokenizer)."""

    completion: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    def render(self, tokenizer) -> tuple[str, str]:
        """(prompt text, completion text) as the model reads them."""
        if not self.messages:
            return self.prompt, self.completion
        if getattr(tokenizer, "chat_template", None) is None:
            raise PetlError("these examples are chat messages, but the backbone's tokenizer has "
                            "no chat template; give prompt/completion columns instead")  # fmt: skip
        chat = [{"role": r, "content": c} for r, c in self.messages]
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        if not full.startswith(prompt):
            raise PetlError("the chat template renders the conversation differently from its "
                            "prompt; give prompt/completion columns instead")  # fmt: skip
        return prompt, full[len(prompt) :]


def lm_task(name: str, splits: dict[str, list[Example]], labels: dict[str, list[int]] | None = None,
            label_words: tuple[str, ...] | None = None) -> Task:  # fmt: skip
    """A task of `Example`s; with `label_words`, each example's completion is the word of its
    label (class ids in `labels`), and the verbalised label's accuracy is scored too."""
    out = {}
    for split, examples in splits.items():
        ids = labels[split] if labels else [0] * len(examples)
        out[split] = Split(examples, torch.tensor(ids, dtype=torch.long))
    return Task(name, "lm", len(label_words or ()), out, "lm", label_names=label_words)


def sentiment_generation() -> Task:
    from petlkit.data.rotten_tomatoes import load_rotten_tomatoes

    data = load_rotten_tomatoes()
    splits, labels = {}, {}
    for split, part in data.items():
        splits[split] = [Example(SENTIMENT_WORDS[y], SENTIMENT_PROMPT.format(text=t))
                         for t, y in zip(part.texts, part.labels, strict=True)]  # fmt: skip
        labels[split] = list(part.labels)
    return lm_task("sentiment-gen", splits, labels, SENTIMENT_WORDS)


def domain_lm(domain: str = "products") -> Task:
    from petlkit.data.vader import split_domain

    splits = {split: [Example(" " + text.strip()) for text, _ in rows]
              for split, rows in split_domain(domain).items()}  # fmt: skip
    return lm_task(f"lm-{domain}", splits)


def _example(row: dict, path: Path, record: int) -> Example:
    where = f"{path}: record {record}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise PetlError(f"{where}: 'messages' must be a list of at least two messages "
                            "(the last one the assistant's answer)")  # fmt: skip
        pairs = []
        for i, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or {"role", "content"} - set(message):
                raise PetlError(f"{where}: message {i} must be an object with 'role' and "
                                "'content'")  # fmt: skip
            if message["role"] not in ROLES:
                raise PetlError(f"{where}: message {i} has role {message['role']!r}; roles are "
                                f"{list(ROLES)}")  # fmt: skip
            pairs.append((message["role"], str(message["content"])))
        if pairs[-1][0] != "assistant" or not pairs[-1][1].strip():
            raise PetlError(f"{where}: the last message must be the assistant's (non-empty): it "
                            "is what the model learns to write")  # fmt: skip
        return Example(pairs[-1][1], messages=tuple(pairs))
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        raise PetlError(f"{where} has no {missing[0]!r} column; columns must be 'prompt' and "
                        "'completion', or a 'messages' list")  # fmt: skip
    if not str(row["completion"]).strip():
        raise PetlError(f"{where} has an empty completion: nothing to learn from it")
    return Example(str(row["completion"]), str(row["prompt"]))


def text_generation_task(folder: str | Path, encoding: str = "utf-8") -> Task:
    """Your prompt/completion (or chat) files; see the module's docstring."""
    from petlkit.tasks.text_files import SPLIT_FILES, _find, read_records

    folder = Path(folder)
    paths = {split: _find(folder, stems) for split, stems in SPLIT_FILES.items()}
    for split in ("train", "val"):
        if paths[split] is None:
            names = " or ".join(f"{s}.jsonl/.csv" for s in SPLIT_FILES[split])
            raise PetlError(f"{folder} has no {split} file; expected {names}")
    splits = {}
    for split, path in paths.items():
        if path is None:
            continue
        rows = read_records(path, encoding)
        if not rows:
            raise PetlError(f"{path} holds no records; add examples or remove the file")
        splits[split] = [_example(row, path, i) for i, row in enumerate(rows, start=1)]
    return lm_task(folder.name, splits)
