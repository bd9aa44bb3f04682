"""A run: backbone + method + task + training settings, from the CLI or a YAML/JSON file.

`train_run` trains and writes into its folder: `run.json` (this spec), `adapter/` (the adapter
checkpoint), `checkpoint.safetensors`, `best.safetensors`, `metrics.jsonl`, `results.json`.
`load_run` rebuilds the trained model from such a folder for evaluation or merging.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from petlkit.backbones import build_model
from petlkit.backbones.registry import (
    Built,
    build_causal_lm,
    build_span_model,
    pretrained_vit_file,
    vit_file_input,
    vit_file_patch,
)
from petlkit.checkpoint import load_adapter, save_adapter
from petlkit.errors import ConfigError, PetlError
from petlkit.io import write_json
from petlkit.methods.prompt import text_init_args
from petlkit.model import PetlModel, attach
from petlkit.registry import make_config
from petlkit.tasks import Task, load_task
from petlkit.tasks.span import squad_task
from petlkit.train.config import TrainConfig
from petlkit.train.sharding import whole_parameters
from petlkit.train.trainer import Trainer

RUN_FILE = "run.json"
KEYS = ("backbone", "method", "method_args", "task", "train", "pooling", "patch_size", "data_dir",
        "shots", "data_seed", "image_size", "resize", "dtype", "encoding", "target")  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    backbone: str
    method: str
    task: str
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    pooling: str = "mean"
    patch_size: int | None = None
    data_dir: str | None = None
    shots: int | None = None
    data_seed: int = 0
    image_size: int = 224  # resolution for file-based image tasks
    resize: int | None = None  # a pretrained ViT at this input side (default: its own)
    dtype: str = "float32"  # the backbone's dtype; trained tensors stay float32 (placement.py)
    encoding: str = "utf-8"  # text-files: the files' encoding
    target: str | None = None  # text-files with both columns: "label" or "score"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; valid: {list(DTYPES)}")
        check_resize(self.resize)

    def load_task(self, tokenizer=None) -> Task:
        if self.task == "squad":  # windows depend on the backbone's tokenizer
            if self.data_dir is None or tokenizer is None:
                raise PetlError("squad reads train-v1.1.json and dev-v1.1.json: pass --data-dir")
            length = self.train_config().max_length
            return squad_task(self.data_dir, tokenizer, max_length=length, stride=length // 3)
        return load_task(self.task, self.data_dir, self.shots, self.data_seed, self.image_size,
                         encoding=self.encoding, target=self.target)  # fmt: skip

    def build_and_load(self) -> tuple[Built, Task]:
        """The backbone and the task (a span task needs the tokenizer first)."""
        if self.task == "squad":
            built = build_for_task(self, None)
            return built, self.load_task(built.tokenizer)
        task = fit_to_backbone(self.load_task(), self.backbone, self.resize)
        return build_for_task(self, task), task

    def train_config(self) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train) - fields)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; valid: {sorted(fields)}")
        return TrainConfig(**self.train)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ConfigError(f"unknown run keys {unknown}; valid keys: {list(KEYS)}")
        missing = [k for k in ("backbone", "method", "task") if k not in data]
        if missing:
            raise ConfigError(f"the run config lacks {missing}; add them")
        return cls(**data)


def read_run_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON run config, parsed with safe loaders only."""
    path = Path(path)
    if not path.is_file():
        raise PetlError(f"no run config at {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)  # the safe loader builds no Python objects
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(
                f"{path} could not be read as a plain YAML run config: {first}"
            ) from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of run keys ({list(KEYS)})")
    return data


def fit_to_backbone(task: Task, backbone: str, resize: int | None = None) -> Task:
    """Images fitted to a pretrained ViT's input: in-memory ones resized (grey → RGB), image
    files read at its size and channels. The size is the ViT's own, or `resize` (its position
    embeddings are then resampled to that grid when the model is built: a cheaper input for
    a CPU, at some cost in accuracy)."""
    path = pretrained_vit_file(backbone) if task.modality == "vision" else None
    if path is None:
        return task
    size, channels = vit_file_input(path)
    if resize is not None:
        patch = vit_file_patch(path)
        if resize % patch:
            near = max(patch, resize // patch * patch)
            raise ConfigError(f"resize {resize} is not a multiple of {backbone}'s patch size "
                              f"{patch}; use e.g. {near}")  # fmt: skip
        size = resize
    return task.with_images(size, channels)


def check_resize(resize: int | None) -> None:
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)
                               or resize <= 0):  # fmt: skip
        raise ConfigError(f"resize must be a positive whole number of pixels, not {resize!r}")


BACKBONE_SEED = 0  # randomly initialised backbones (vit-tiny, ...) are the same in every command


def build_for_task(spec: RunSpec, task: Task | None) -> Built:
    """The task model in the run's dtype (the backbone seed fixed for random backbones)."""
    torch.manual_seed(BACKBONE_SEED)
    if task is not None and task.modality == "lm":
        return build_causal_lm(spec.backbone, dtype=DTYPES[spec.dtype])
    if task is None or task.modality == "span":
        built = build_span_model(spec.backbone)
    elif task.modality == "vision":
        size = task.image_size
        patch = spec.patch_size or (16 if size >= 64 else max(1, size // 4))
        built = build_model(spec.backbone, task.num_labels, img_size=size, patch_size=patch,
                            in_chans=task.channels)  # fmt: skip
    else:
        built = build_model(spec.backbone, task.num_labels, pooling=spec.pooling)
    built.model.to(DTYPES[spec.dtype])
    return built


RUN_OUTPUTS = (RUN_FILE, "checkpoint.safetensors", "best.safetensors", "metrics.jsonl",
               "results.json", "adapter")  # fmt: skip


def prepare_run_folder(spec: RunSpec, output: Path, resume: bool, overwrite: bool) -> RunSpec:
    """Check the folder before anything is written: a new run needs a folder without a run in
    it (or --overwrite, which clears the old run's files); --resume needs the same settings as
    the run it continues. Returns the spec with its data path made absolute."""
    if spec.data_dir is not None:
        spec = dataclasses.replace(spec, data_dir=str(Path(spec.data_dir).resolve()))
    if output.exists() and not output.is_dir():
        raise PetlError(f"--output {output} is a file, not a folder; pick a folder path")
    blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise PetlError(f"--output {output} lies under {blocker}, which is a file; pick a folder")
    _check_writable(output)
    saved_path = output / RUN_FILE
    held = [n for n in RUN_OUTPUTS if (output / n).exists()]
    if resume:
        if not saved_path.is_file():
            raise PetlError(f"--resume: {output} holds no run ({RUN_FILE}); start without --resume")
        saved = json.loads(saved_path.read_text())
        wanted = dataclasses.asdict(spec)
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            detail = "; ".join(f"{k}: {saved.get(k)!r} → {wanted.get(k)!r}" for k in changed)
            raise PetlError(
                f"--resume continues {output} exactly as it was started, but these settings "
                f"differ from its {RUN_FILE}: {detail}; drop them, or train a new run elsewhere "
                "(or --overwrite)"
            )
        return spec
    if held and not overwrite:
        what = ""
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            what = f" ({saved.get('method')} on {saved.get('task')}, {saved.get('backbone')})"
        raise PetlError(
            f"{output} holds a run already{what}; --resume continues it, --overwrite replaces it, "
            "or pick another --output"
        )
    for name in held:  # --overwrite: the old run's files go before the new run writes any
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return spec


def _check_writable(folder: Path) -> None:
    """Write a probe file there now, not at the first checkpoint; folders made for the probe
    are removed again (a refused run leaves nothing behind)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".petlkit-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
        for path in created:  # deepest first
            path.rmdir()
    except OSError as err:
        raise PetlError(
            f"cannot write to {folder} ({err.strerror or err}); pick a writable --output folder"
        ) from err


def check_space(folder: Path, model: PetlModel) -> None:
    """Refuse to start when the disk cannot hold the run's checkpoints (trained tensors, the
    best ones, two AdamW moments, the adapter), with a margin of 1 MiB."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needed = 5 * trained + 2**20
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PetlError(
            f"{folder} has {free / 2**20:.1f} MiB free; this run's checkpoints need about "
            f"{needed / 2**20:.1f} MiB: free space or pick another --output"
        )


def train_run(
    spec: RunSpec,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
):
    output = Path(output)
    make_config(spec.method, **text_init_args(spec.method_args, None))  # fails before any file
    spec = prepare_run_folder(spec, output, resume, overwrite)
    config = spec.train_config()
    built, task = spec.build_and_load()
    if task.modality != "span" and built.modality != task.modality:
        raise PetlError(f"backbone {spec.backbone!r} is {built.modality}; task {spec.task!r} is "
                        f"{task.modality}")  # fmt: skip
    model = attach(built.model, spec.method, **text_init_args(spec.method_args, built.tokenizer))
    check_space(output, model)
    trainer = Trainer(model, task, config, output, built.tokenizer, progress=progress)
    if trainer.accelerator.is_main_process:
        write_json(output / RUN_FILE, dataclasses.asdict(spec))
    results = trainer.fit(resume=resume)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    with whole_parameters(model, trained):  # a sharded run: its trained tensors, gathered
        if trainer.accelerator.is_main_process:
            save_adapter(model, output / "adapter", labels=task.label_names)
    return results


def load_run(
    folder: str | Path, task: Task | None = None, data_dir: str | None = None
) -> tuple[PetlModel, RunSpec, Built]:
    """The trained model of a run folder; `data_dir` overrides where its data is read from."""
    folder = Path(folder)
    if not (folder / RUN_FILE).is_file():
        raise PetlError(f"{folder} is not a petlkit run folder (no {RUN_FILE}); give `train`'s "
                        "--output folder")  # fmt: skip
    spec = RunSpec.from_dict(json.loads((folder / RUN_FILE).read_text()))
    if data_dir is not None:
        spec = dataclasses.replace(spec, data_dir=str(Path(data_dir).resolve()))
    if task is None:
        built, task = spec.build_and_load()
    else:
        built = build_for_task(spec, task)
    return load_adapter(built.model, folder / "adapter"), spec, built
