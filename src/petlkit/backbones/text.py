"""BERT-family text encoders from transformers, with a classification head on top."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from petlkit.errors import PetlError
from petlkit.layout import BackboneLayout, layout_of, rooted

POOLINGS = ("cls", "mean", "last")


class _EncoderTaskModel(nn.Module):
    """A transformers encoder with a linear head of `outputs` units (N(0, 0.02), zero bias)."""

    def __init__(self, encoder: nn.Module, outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, outputs)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.encoder(input_ids=input_ids, **kwargs).last_hidden_state

    def petl_layout(self) -> BackboneLayout:
        return encoder_layout(self.encoder, prefix="encoder.")

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """transformers' own per-layer checkpointing (non-reentrant, so frozen inputs work)."""
        new = hasattr(self.encoder, "activation_checkpointing_enable")  # transformers ≥ 5.x
        if not enabled:
            off = "activation_checkpointing_disable" if new else "gradient_checkpointing_disable"
            getattr(self.encoder, off)()
            return
        on = "activation_checkpointing_enable" if new else "gradient_checkpointing_enable"
        kwargs = {"use_reentrant": False}
        params = inspect.signature(getattr(self.encoder, on)).parameters
        key = next(k for k in params if k.endswith("checkpointing_kwargs"))
        getattr(self.encoder, on)(**{key: kwargs})


class TextClassifier(_EncoderTaskModel):
    """encoder → pooled token (CLS, masked mean, or the last real token for decoders) →
    dropout → head."""

    def __init__(
        self, encoder: nn.Module, num_labels: int, pooling: str = "cls", dropout: float = 0.1
    ) -> None:
        if pooling not in POOLINGS:
            raise PetlError(f"unknown pooling {pooling!r}; valid: {list(POOLINGS)}")
        super().__init__(encoder, num_labels)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":  # decoders: the last real token (padding on either side)
            if attention_mask is None:
                return hidden[:, -1]
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (attention_mask.to(positions.dtype) * (positions + 1)).argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head(self.dropout(self.pool(hidden, attention_mask)))


class TextSpanModel(_EncoderTaskModel):
    """encoder → per-token (start, end) logits, for extractive question answering."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__(encoder, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.head(self.encode(input_ids, attention_mask, token_type_ids))
        if attention_mask is not None:  # padding can never be a start or an end
            logits = logits.masked_fill(attention_mask.unsqueeze(-1) == 0, -1e4)
        return logits


def encoder_layout(encoder: nn.Module, prefix: str = "") -> BackboneLayout:
    """The block layout of a transformers encoder of any supported family (families.py), its
    names under `prefix` in the task model that holds it."""
    return rooted(layout_of(encoder), prefix, ("head",))


def load_encoder(path: str | Path) -> tuple[nn.Module, object]:
    """(encoder, tokenizer) from a local transformers folder; never touches the network."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the unused pooler; not news
    hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PetlError(f"{path} is not a transformers model folder (no config.json)")
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    except TypeError:  # architectures without a pooler
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return encoder, tokenizer
