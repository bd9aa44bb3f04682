"""A task: named splits of examples, their modality, and the metric that scores predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from petlkit.errors import PetlError
from petlkit.tasks.metrics import METRICS


@dataclass(frozen=True)
class Split:
    """inputs: texts (text tasks) or a (N, C, H, W) float tensor (vision); labels: class ids
    (long) or scores (float, regression)."""

    inputs: Sequence[str] | torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise PetlError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def k_shot(self, k: int, seed: int = 0) -> Split:
        """k examples of every class, drawn with `seed` (classification splits)."""
        gen = torch.Generator().manual_seed(seed)
        chosen = []
        for label in self.labels.unique().tolist():
            members = (self.labels == label).nonzero().flatten()
            if len(members) < k:
                raise PetlError(f"class {label} has {len(members)} examples, fewer than k={k}")
            chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
        return self.subset(torch.cat(chosen).sort().values)

    def subset(self, index: Sequence[int] | torch.Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            return Split(self.inputs[index], self.labels[index])
        if hasattr(self.inputs, "take"):  # lazily loaded images
            return Split(self.inputs.take(index.tolist()), self.labels[index])
        return Split([self.inputs[i] for i in index.tolist()], self.labels[index])


@dataclass(frozen=True)
class Task:
    name: str
    modality: str  # "text", "vision", "span" (extractive question answering) or "lm" (generation)
    num_labels: int  # 1 for regression
    splits: dict[str, Split]
    metric: str = "accuracy"  # a key of petlkit.tasks.metrics.METRICS; its first value selects
    pair: bool = field(default=False)  # text inputs are (a, b) pairs joined by the tokenizer
    image_size: int = 0  # vision: side of the square images
    channels: int = 3  # vision: image channels
    examples: dict | None = None  # span tasks: the questions behind each split's windows
    label_names: tuple[str, ...] | None = None  # class id → the label as the data writes it

    def __post_init__(self) -> None:
        if self.metric not in METRICS and self.metric not in ("squad", "lm"):
            raise PetlError(f"unknown metric {self.metric!r}; valid: {sorted(METRICS)}")
        for needed in ("train", "val"):
            if needed not in self.splits:
                raise PetlError(f"task {self.name!r} has no {needed!r} split")

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def with_images(self, size: int, channels: int) -> Task:
        """This image task at `size`×`size` with `channels` channels (bilinear resize; grey
        repeated to 3 channels), so it fits a pretrained backbone's input; unchanged if it
        already does."""
        if (size, channels) == (self.image_size, self.channels):
            return self
        if self.modality != "vision":
            raise PetlError(f"task {self.name!r} is {self.modality}, not images")
        files = [s for s in self.splits.values() if not isinstance(s.inputs, torch.Tensor)]
        if files:  # image files: read them at the backbone's size, as grey or RGB
            splits = {
                n: Split(
                    dataclasses.replace(s.inputs, resolution=size, channels=channels), s.labels
                )  # fmt: skip
                for n, s in self.splits.items()
            }
            return dataclasses.replace(self, splits=splits, image_size=size, channels=channels)
        if channels not in (self.channels, 3) or self.channels not in (1, channels):
            raise PetlError(f"task {self.name!r} has {self.channels}-channel images; the backbone "
                            f"takes {channels} (only grey → RGB is converted)")  # fmt: skip
        splits = {}
        for name, split in self.splits.items():
            images = split.inputs
            if images.shape[-1] != size:
                images = F.interpolate(images, size=(size, size), mode="bilinear",
                                       align_corners=False)  # fmt: skip
            splits[name] = Split(images.expand(-1, channels, -1, -1).contiguous(), split.labels)
        return dataclasses.replace(self, splits=splits, image_size=size, channels=channels)

    def check_trainable(self) -> None:
        """Refuse data no model can learn from, before any training (one line, the fix)."""
        for name, split in self.splits.items():
            if len(split) == 0:
                raise PetlError(f"task {self.name!r}: its {name} split is empty; add examples")
        train = self.splits["train"]
        if len(train) < 2:
            raise PetlError(f"task {self.name!r} has {len(train)} training example; it needs at "
                            "least 2 (and examples of at least 2 classes)")  # fmt: skip
        if self.modality == "lm":  # completions to learn; label words (if any) are not classes
            return
        if self.num_labels < 2 and self.metric != "correlation" and self.modality != "span":
            only = self.label_names[0] if self.label_names else 0
            raise PetlError(f"task {self.name!r}: every training example has label {only!r}; a "
                            "classifier needs at least 2 classes")  # fmt: skip
        if not self.regression and self.modality != "span":
            present = sorted({int(x) for x in train.labels.tolist()})
            if len(present) < 2:
                label = self.label_names[present[0]] if self.label_names else present[0]
                raise PetlError(f"task {self.name!r}: every training example has label "
                                f"{label!r}; a classifier needs at least 2 classes")  # fmt: skip

    def score(self, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metric name → value; the first entry is the one model selection uses."""
        fn: Callable = METRICS[self.metric]
        return fn(predictions, labels)
