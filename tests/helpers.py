"""Small helpers the tests share."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from petlkit.bench import MethodEntry, Preset
from petlkit.cli import main


def train_steps(model, inputs, labels, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the trainable parameters (dropout off for exact comparisons)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(**inputs), labels).backward()
        opt.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bench_record(task, method, seed, score, trainable, group="g", **extra):
    """A results.jsonl record of a bench cell, for report tests."""
    return {"cell": f"{task}-{method}-{seed}", "task": task, "group": group, "method": method,
            "seed": seed, "shots": None, "metric": "accuracy", "score": score,
            "trainable": trainable, "percent": trainable / 1e4, "lr": 1e-3,
            "grid": [3e-4, 1e-3, 3e-3], "edge": None, **extra}  # fmt: skip


def tiny_preset(backbone: str) -> Preset:
    return Preset(
        "tiny", backbone, {"digits": "natural-like", "shapes-count": "structured"},
        {"linear": MethodEntry("linear", lr=1e-2), "sas": MethodEntry("sas", lr=1e-2),
         "lora": MethodEntry("lora", {"r": 2}, 1e-2)},
        seeds=(0, 1), train=dict(steps=3, batch_size=8, eval_every=1, checkpoint_every=1),
        eval_limit=50, val_limit=50, shots=(1, 2), fewshot_tasks=("digits",),
        fewshot_methods=("sas",),
        dg={"digits": ("shapes-count",)}, widen=0,
    )  # fmt: skip


def benchmark_script(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, to call its functions."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the command line's bad-input cases --------------------------------------------------------
TRAIN = ["train", "--steps", "2", "--batch-size", "8"]
TINY = ["--backbone", "vit-tiny", "--task", "digits"]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    output = capsys.readouterr().err
    assert "Traceback" not in output, output
    errors = [line for line in output.replace("\r", "\n").splitlines() if "petlkit:" in line]
    assert len(errors) == 1 and errors[0].startswith("petlkit: error: "), output  # progress aside
    err = errors[0]
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def train_with(tmp_path, *extra: str) -> list[str]:
    return [*TRAIN, *extra, "--output", str(tmp_path / "out")]


def nothing_written(tmp_path) -> bool:
    """A refused `train` left its --output folder (tmp_path / "out") absent or empty."""
    out = tmp_path / "out"
    return not out.exists() or not any(p.name != "." for p in out.iterdir())


def run_results(folder) -> dict:
    """A run's results.json without its measurements (peak memory differs between two runs of
    the same training): what must repeat exactly."""
    import json
    from pathlib import Path

    results = json.loads((Path(folder) / "results.json").read_text())
    results.pop("peak_memory_mb", None)
    return results


def tiny_llama(seed: int = 0):
    """A 2-layer LLaMA decoder, random weights from `seed`, the MiniLM tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=16, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    config = LlamaConfig(vocab_size=30522, **shape)
    return LlamaForCausalLM(config)


def save_tiny_llama(folder: Path) -> Path:
    """`tiny_llama()` and the MiniLM tokenizer saved as a transformers folder."""
    from transformers import AutoTokenizer

    from petlkit.backbones.registry import minilm_path

    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(folder)
    return folder


LM_ROWS = [{"prompt": f"question {i} is", "completion": f" answer {i % 3}"} for i in range(12)]


def lm_files(folder: Path, rows: list[dict], splits=("train", "val", "test")) -> Path:
    """`rows` (prompt/completion or messages dicts) written as each split's JSONL file."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def attached_and_perturbed(case, method: str, **fields):
    """`method` attached to a fresh model of `case`, its trained tensors moved off their initial
    values (LoRA's and the adapters' zero up-projections make an untrained method the identity)."""
    import petlkit

    petl = petlkit.attach(case.make(), method, **fields)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return petl


class OpSizes(TorchDispatchMode):
    """The ATen ops run inside it, each as (name, elements of its largest tensor argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, max(sizes, default=0)))
        return func(*args, **(kwargs or {}))
