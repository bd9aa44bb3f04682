"""What `petlkit cost` counts: a backbone at a batch shape, the floor and each method on it.

Uses only `petlkit.attach`, `petlkit.build_model` and `petlkit.backbones.vit`, which an older
petlkit has too: the calibration (benchmarks/cost_calibration.py) counts the code the GPU ground
truth was measured on with this file and today's counter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import petlkit
from petlkit.backbones import vit
from petlkit.errors import PetlError

from .counter import StepCount
from .step import count_step

# ViT shapes the ground truth names; any other backbone goes through build_model.
VIT_SHAPES = {"vit-b16": dict(preset="vit_base", patch_size=16),
              "vit-tiny": dict(preset="vit_tiny", patch_size=4)}  # fmt: skip
FLOOR = "floor"


@dataclass
class Case:
    """A task model (random weights, real shapes), one batch and its labels."""

    model: nn.Module
    batch: dict
    labels: torch.Tensor
    family: str  # "vision" or "text"


def build_case(backbone: str, batch: int, size: int, num_classes: int = 10) -> Case:
    """`size`: image side in pixels (vision) or tokens per sequence (text). A transformers
    config (a config.json, or a folder holding one) is counted at its shapes without its
    weights (`case_from_config`)."""
    torch.manual_seed(0)
    config = _config_file(backbone)
    if config is not None:
        return case_from_config(config, batch, size, num_classes)
    labels = torch.randint(0, num_classes, (batch,))
    if backbone in VIT_SHAPES:
        shape = dict(VIT_SHAPES[backbone])
        model = vit(shape.pop("preset"), img_size=size, num_classes=num_classes, **shape)
        return Case(model, {"pixels": torch.randn(batch, 3, size, size)}, labels, "vision")
    built = petlkit.build_model(backbone, num_classes=num_classes)
    if built.modality == "vision":
        return Case(built.model, {"pixels": torch.randn(batch, 3, size, size)}, labels, "vision")
    ids = torch.randint(1000, 20000, (batch, size))
    if built.modality == "lm":  # next-token loss on every position
        labels = torch.randint(1000, 20000, (batch, size))
    # no padding, so no mask: the trainer leaves out a mask that masks nothing (train/inputs.py)
    return Case(built.model, {"input_ids": ids}, labels, "text")


def _config_file(backbone: str) -> Path | None:
    path = Path(backbone)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    return path if path.is_file() and path.suffix == ".json" else None


def case_from_config(config_file: Path, batch: int, size: int, num_classes: int = 10,
                     device: str = "meta") -> Case:  # fmt: skip
    """A task model of the architecture a transformers config describes, built on the meta
    device (`device`): no weights are read or made, so a model too large for this machine is
    counted as well (the counter makes each meta tensor a fake CPU one). A text model gets a
    classifier (a decoder pools its last token, an encoder its first, as `petlkit train`
    would); an image model is transformers' own classifier of it, at `size` pixels."""
    from transformers import AutoConfig

    from petlkit.backbones.text import TextClassifier
    from petlkit.layout import layout_of

    config = AutoConfig.from_pretrained(config_file)
    labels = torch.randint(0, num_classes, (batch,))
    vocabulary = getattr(config, "vocab_size", None)
    if not vocabulary and getattr(config, "image_size", None):
        return _image_case(config, config_file, size, num_classes, labels, device)
    if not vocabulary:
        raise PetlError(f"{config_file}: counting from a config takes a text model's config "
                        "(one with vocab_size) or an image model's (image_size)")  # fmt: skip
    with torch.device(device):
        try:
            encoder = _built(config, config_file, "AutoModel", "Model", "model",
                             add_pooling_layer=False)  # fmt: skip
        except TypeError:  # architectures without a pooler
            encoder = _built(config, config_file, "AutoModel", "Model", "model")
        pooling = "last" if layout_of(encoder).causal else "cls"
        model = TextClassifier(encoder, num_classes, pooling)
    ids = torch.randint(0, vocabulary, (batch, size))
    return Case(model, {"input_ids": ids}, labels, "text")


def _image_case(config, source: Path, size: int, num_classes: int, labels: torch.Tensor,
                device: str) -> Case:  # fmt: skip
    """An image classifier of the architecture `config` describes (transformers' own, with its
    head), at `size` pixels, on `device`."""
    config.image_size, config.num_labels = size, num_classes
    with torch.device(device):
        model = _built(config, source, "AutoModelForImageClassification",
                       "ForImageClassification", "image classifier")  # fmt: skip
    pixels = torch.randn(len(labels), getattr(config, "num_channels", 3), size, size)
    return Case(model, {"pixel_values": pixels}, labels, "vision")


def _built(config, source: Path, auto: str, suffix: str, what: str, **kwargs) -> nn.Module:
    """`config`'s model from transformers' `auto` class, else from the class named after the
    config (a text tower AutoModel does not map, SiglipTextConfig → SiglipTextModel; a config
    the auto class maps to several, DeiTConfig → DeiTForImageClassification)."""
    import transformers

    try:
        return getattr(transformers, auto).from_config(config, **kwargs)
    except TypeError:
        if kwargs:
            raise  # an argument the class does not take (a pooler where there is none)
    except ValueError:
        pass  # a config the auto class does not map
    name = type(config).__name__.removesuffix("Config") + suffix
    if not hasattr(transformers, name):
        raise PetlError(f"{source}: transformers builds no {what} from {type(config).__name__} "
                        f"(looked for {auto}'s and {name})")  # fmt: skip
    return getattr(transformers, name)(config, **kwargs)


def floor_model(case: Case) -> tuple[nn.Module, dict]:
    """The frozen backbone with a gradient wanted at its inputs: the pixels, or the embedding
    output (token ids have no gradient). No PETL step can cost less."""
    model = copy.deepcopy(case.model).train()
    model.requires_grad_(False)
    if case.family == "vision":  # one input: the images, as `pixels` or `pixel_values`
        ((key, images),) = case.batch.items()
        return model, {key: images.clone().requires_grad_(True)}
    _input_embeddings(model).register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    return model, case.batch


def _input_embeddings(model: nn.Module) -> nn.Module:
    for name in ("encoder.embeddings", "embeddings"):
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return next(m for m in model.modules() if isinstance(m, nn.Embedding))


def method_model(case: Case, method: str, **kwargs) -> nn.Module:
    return petlkit.attach(copy.deepcopy(case.model), method, **kwargs).train()


def count(case: Case, method: str, kwargs: dict | None = None, dtype: torch.dtype = torch.bfloat16,
          fake: bool = True, fold: bool = False, sources: bool = False,
          fused: bool = True) -> StepCount:  # fmt: skip
    """One step of `method` (or FLOOR) on `case`, counted; `fold`: trained folded into the
    weights it adapts (methods/folding.py); `sources`: where each call comes from; `fused`:
    AdamW's fused form (False: the multi-tensor form, step.count_step)."""
    if method == FLOOR:
        model, batch = floor_model(case)
    else:
        model, batch = method_model(case, method, **(kwargs or {})), case.batch
        if fold:
            model.set_folded(True)
    return count_step(model, batch, case.labels, _logits, dtype=dtype, fake=fake, sources=sources,
                      fused=fused)  # fmt: skip


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return getattr(out, "logits", out)  # a transformers language model's output, or the logits


def count_rows(spec: dict) -> dict[str, dict[str, int]]:
    """Totals per row of a ground-truth table ({backbone, batch, size, rows: [{name, method,
    kwargs}]}), keyed by row name, counted with the multi-tensor AdamW the table was measured
    with."""
    case = build_case(spec["backbone"], spec["batch"], spec["size"])
    return {row["name"]: count(case, row["method"], row["kwargs"], fused=False).totals()
            for row in spec["rows"]}  # fmt: skip
