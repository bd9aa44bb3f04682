"""Shared fixtures: tiny random backbones and the real MiniLM-L6, each with ready inputs."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import BertConfig, BertModel

from petlkit.backbones import TextClassifier, build_model, vit
from petlkit.backbones.vit import VisionTransformer, ViTConfig
from petlkit.backbones.vit_weights import save_vit

NUM_CLASSES = 3


@dataclass
class Case:
    """A backbone kind: `make()` gives a fresh task model, identical on every call."""

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


def _seeded(fn: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return fn().eval()

    return make


def tiny_vit_case() -> Case:
    make = _seeded(
        lambda: vit(
            "vit_tiny",
            img_size=16,
            patch_size=4,
            depth=2,
            embed_dim=32,
            num_heads=4,
            num_classes=NUM_CLASSES,
        )
    )
    gen = torch.Generator().manual_seed(1)
    return Case(
        "tiny-vit",
        make,
        {"pixels": torch.randn(4, 3, 16, 16, generator=gen)},
        torch.tensor([0, 1, 2, 1]),
    )


def _text_inputs(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, vocab, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding must be respected by every method
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_bert_case() -> Case:
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    make = _seeded(lambda: TextClassifier(BertModel(config, add_pooling_layer=False), NUM_CLASSES))
    return Case("tiny-bert", make, _text_inputs(99), torch.tensor([0, 1, 2, 1]))


@functools.cache
def _minilm_template() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("minilm-l6", NUM_CLASSES).model.eval()


def minilm_case() -> Case:
    make = lambda: copy.deepcopy(_minilm_template())  # noqa: E731
    return Case("minilm", make, _text_inputs(1000), torch.tensor([0, 1, 2, 1]))


CASES = {"tiny-vit": tiny_vit_case, "tiny-bert": tiny_bert_case, "minilm": minilm_case}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]()


@pytest.fixture
def vit_case() -> Case:
    return tiny_vit_case()


@pytest.fixture
def bert_case() -> Case:
    return tiny_bert_case()


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    """A small 28-px grey ViT file standing in for the shipped one."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                    depth=2, num_heads=2)  # fmt: skip
    path = tmp_path_factory.mktemp("vit") / "tiny.safetensors"
    save_vit(VisionTransformer(cfg), path)
    return str(path)
