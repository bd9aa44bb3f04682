"""Soft prompts: prompt tuning (Lester et al., 2021) and VPT (Jia et al., 2022).

Prompt tuning prepends n learned tokens to the input. By default after the embedding layer (the
spec of UniPELT+prompt's prompt-tuning layer): on text in front of the embedding layer's output,
so the prompts get no position embeddings and real tokens keep positions 0..n−1; on a ViT after
the class token, after the position embedding. `placement="before_embeddings"` (text) puts them in
front of the word embeddings instead, so the encoder adds position embeddings to them, as in
Lester et al. and HF PEFT. Optionally gated (G over the embedded input).
VPT (ViT only) inserts n tokens after the class token; deep VPT replaces them before every block
with that block's own tokens. Either way the prompt positions are dropped before the final norm,
so the head sees the sequence it would see without prompts.

Prompt tuning's tokens start uniform(−0.5, 0.5) (the spec of the prompt-tuning layer) or, with
`init="vocab"`, as copies of word embeddings drawn from the model's own vocabulary (Lester et al.
2021, §3.2 and Fig. 3(b): sampled-vocabulary init beats random-uniform init, most at small
models). Rows are drawn uniformly over the whole vocabulary with torch's generator (the run's
seed); Lester et al. draw from the 5,000 most common tokens, which a tokenizer does not record.
With `init="tokens"` they start as the word embeddings of given token ids (`init_tokens`, repeated
to fill the length and cut to it), e.g. a task's instruction or its label words (Lester et al.'s
text and class-label inits; HF PEFT's `PromptTuningInit.TEXT`). The command line and the bench
take the text (`init_text`, UniPELT: `prompt_init_text`) and tokenize it with the run's tokenizer
(`text_init_args`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from petlkit.backbones.prompt_tokens import PROMPT_PLACEMENTS, add_prompt_tokens
from petlkit.config import (
    MethodConfig,
    check_bool,
    check_choice,
    check_finite,
    check_positive_int,
    check_probability,
    check_range,
)
from petlkit.errors import ConfigError, PetlError
from petlkit.layout import BackboneLayout, layout_of, word_embeddings
from petlkit.methods.base import Method
from petlkit.methods.gate import Gate
from petlkit.methods.placement import follow
from petlkit.registry import register_method

NO_MERGE = "prompt tokens lengthen the sequence, so they cannot fold into weights"
PROMPT_INITS = ("uniform", "vocab", "tokens")
# method arguments holding a text to start prompts from → the (init, token ids) fields they set
TEXT_INIT_ARGS = {"init_text": ("init", "init_tokens"),
                  "prompt_init_text": ("prompt_init", "prompt_init_tokens")}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PromptConfig(MethodConfig):
    """length: soft tokens; init: 'uniform' (uniform(-init_range, init_range)), 'vocab'
    (word embeddings drawn from the model's vocabulary) or 'tokens' (the word embeddings of
    init_tokens, repeated to the length); gated: multiply the tokens by a gate G(embedded input);
    placement: 'after_embeddings' (default) or 'before_embeddings' (text only: prompts get
    position embeddings)."""

    length: int = 10
    init: str = "uniform"
    init_range: float = 0.5
    init_tokens: tuple[int, ...] = ()
    gated: bool = False
    placement: str = "after_embeddings"

    def validate(self) -> None:
        check_positive_int("PromptConfig", "length", self.length)
        check_finite("PromptConfig", "init_range", self.init_range, positive=True)
        check_range("PromptConfig", "init_range", self.init_range, 0, 10)
        check_choice("PromptConfig", "init", self.init, PROMPT_INITS)
        check_init_tokens("PromptConfig", "init", self.init, "init_tokens", self.init_tokens)
        check_bool("PromptConfig", "gated", self.gated)
        check_choice("PromptConfig", "placement", self.placement, PROMPT_PLACEMENTS)


@register_method("prompt")
class Prompt(Method):
    config_cls = PromptConfig
    default_lr = 3e-2
    merge_refusal = NO_MERGE

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        layout = layout_of(model)
        width = layout.embed_dim or layout.width  # ALBERT, ELECTRA: narrower embeddings
        if cfg.init in ("vocab", "tokens"):
            self.prompt = nn.Parameter(word_embedding_rows(model, layout, cfg))
        else:
            self.prompt = nn.Parameter(torch.empty(cfg.length, width))
            nn.init.uniform_(self.prompt, -cfg.init_range, cfg.init_range)
        if cfg.gated:
            if layout.causal:
                raise PetlError(
                    "a gated prompt's gate averages the whole input, which on a causal model "
                    "would let every position read the tokens after it; use gated=False here"
                )
            self.gate = Gate(width)
        self._handle = add_prompt_tokens(
            model, layout, self._tokens, placement=cfg.placement, count=self._count
        )

    def _count(self) -> int:
        return self.config.length if self.enabled else 0

    def detach(self, model: nn.Module) -> None:
        self._handle.remove()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        tokens = follow(self.prompt, x).expand(x.shape[0], *self.prompt.shape)
        if self.config.gated:
            tokens = tokens * self.gate(x).view(-1, 1, 1).to(tokens.dtype)
        return tokens


def check_init_tokens(owner: str, init_name: str, init: str, name: str, tokens: tuple) -> None:
    """`tokens` (token ids) are given exactly when `init` is 'tokens'."""
    ids = isinstance(tokens, tuple)  # a list from JSON is made a tuple by the config
    if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise ConfigError(f"{owner}.{name} must be token ids (integers ≥ 0), got {tokens!r}")
    if init == "tokens" and not tokens:
        raise ConfigError(f"{owner}.{init_name}='tokens' starts from token ids; give "
                          f"{name} (or, on the command line, the text: init_text)")  # fmt: skip
    if tokens and init != "tokens":
        raise ConfigError(f"{owner}.{name} is read only with {init_name}='tokens' (it is "
                          f"{init!r})")  # fmt: skip


def word_embedding_rows(
    model: nn.Module, layout: BackboneLayout, cfg: PromptConfig
) -> torch.Tensor:
    """`cfg.length` rows of the model's word-embedding table, as a float32 CPU copy (the method's
    tensors are placed and cast with the others): drawn uniformly with torch's generator
    (init 'vocab'), or those of `cfg.init_tokens` repeated to the length (init 'tokens')."""
    weight = getattr(word_embeddings(model, layout.inputs), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PetlError(
            f"prompt init={cfg.init!r} copies word embeddings, and {type(model).__name__} has no "
            "word-embedding table (a transformers text model's get_input_embeddings()); use "
            "init='uniform'"
        )
    if weight.is_meta:
        raise PetlError(
            f"prompt init={cfg.init!r} copies word embeddings, and this model's are on the meta "
            "device (no values yet); load its weights before attaching, or use init='uniform'"
        )
    if cfg.init == "vocab":
        rows = torch.randint(weight.shape[0], (cfg.length,))
    else:
        tokens = torch.tensor(cfg.init_tokens)
        if int(tokens.max()) >= weight.shape[0]:
            raise PetlError(f"prompt init_tokens {sorted(set(tokens.tolist()))} reach past the "
                            f"model's {weight.shape[0]} word embeddings; tokenize with the "
                            "model's own tokenizer")  # fmt: skip
        rows = tokens.repeat(math.ceil(cfg.length / len(tokens)))[: cfg.length]
    return weight.detach()[rows.to(weight.device)].to("cpu", torch.float32)


def text_init_args(args: dict, tokenizer) -> dict:
    """Method arguments with a prompt's start given as text (`init_text`; UniPELT:
    `prompt_init_text`) turned into the token ids `tokenizer` gives it (no special tokens), with
    init 'tokens'. tokenizer None: placeholder ids, to check the other arguments before anything
    is loaded."""
    out = dict(args)
    for key, (init_name, tokens_name) in TEXT_INIT_ARGS.items():
        if key not in out:
            continue
        text = out.pop(key)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{key} must be a non-empty text, got {text!r}")
        ids = [0] if tokenizer is None else tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"{key} {text!r} gives no tokens")
        out.update({init_name: "tokens", tokens_name: tuple(ids)})
    return out


@dataclasses.dataclass(frozen=True)
class VPTConfig(MethodConfig):
    """length: prompt tokens per block; deep: new tokens before every block (else only the first);
    dropout on the prompt tokens."""

    length: int = 10
    deep: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive_int("VPTConfig", "length", self.length)
        check_bool("VPTConfig", "deep", self.deep)
        check_probability("VPTConfig", "dropout", self.dropout)


@register_method("vpt")
class VPT(Method):
    config_cls = VPTConfig
    transient = ("_blocks",)
    default_lr = 1e-2
    merge_refusal = NO_MERGE

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        layout = layout_of(model)
        patch = getattr(getattr(model, "cfg", None), "patch_size", None)
        if layout.encoder is not None or patch is None:
            raise PetlError(
                f"VPT needs the project ViT: it replaces tokens before every block through the "
                f"ViT's hook points, which {type(model).__name__} does not have; use 'prompt' (one "
                "layer of soft tokens) or 'prefix' (tokens in every block) on it"
            )
        # Jia et al.: uniform(-v, v), v = sqrt(6 / (channels·patch² + width)) (Xavier over a patch)
        channels = model.cfg.in_chans
        bound = math.sqrt(6.0 / (channels * patch * patch + layout.width))
        blocks = layout.depth if cfg.deep else 1
        self.prompts = nn.Parameter(torch.empty(blocks, cfg.length, layout.width))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        per_block = self._block_tokens if cfg.deep else None
        self._handle = add_prompt_tokens(model, layout, self._first_tokens, per_block)

    def detach(self, model: nn.Module) -> None:
        self._handle.remove()

    def _expand(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self._blocks[index].expand(x.shape[0], -1, -1))

    def _first_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """The embedding's hook, first in every forward: all blocks' prompts cast once and split
        with one unbind (whose backward is one stack, not a zero-filled copy per block)."""
        if not self.enabled:
            return None
        self._blocks = follow(self.prompts, x).unbind(0)
        return self._expand(0, x)

    def _block_tokens(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        return self._expand(index, x) if self.enabled else None
