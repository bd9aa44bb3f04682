"""LoRA on a fused q|k|v linear: the current forward (all parts' up-projections in one block
matrix, added to the output inside one GEMM) ÷ the previous one (per-part einsum, then an
index_add scatter with an index tensor made every forward), interleaved in one process.

    python benchmarks/lora_fused_qkv.py [--repeats 9] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cases import add_device_args, sync, where  # noqa: E402

import petlkit  # noqa: E402
from petlkit.backbones import vit  # noqa: E402
from petlkit.methods.lora import LoRALinear  # noqa: E402
from petlkit.methods.placement import follow  # noqa: E402


def previous_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The forward LoRALinear had before (kept here only to measure against)."""
    out = self.base_layer(x)
    h = self.dropout(x) @ follow(self.lora_A, x).t()
    h = h.unflatten(-1, (self.lora_B.shape[0], self.r))
    delta = torch.einsum("...pr,por->...po", h, follow(self.lora_B, h)) * self.scaling
    chunks = out.unflatten(-1, (self.num_chunks, -1))
    index = torch.tensor(self.parts, device=out.device)
    return chunks.index_add(-2, index, delta.to(out.dtype)).flatten(-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    add_device_args(parser)
    args = parser.parse_args()
    device = args.device
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.zeros(64, dtype=torch.long, device=device)
    print(f"ViT-Tiny, batch 64 × 32 px / patch 4; torch {torch.__version__}, {where(args)}, "
          f"median of {args.repeats} interleaved steps (forward + backward)")  # fmt: skip
    print("\n| LoRA parts | previous | current | current ÷ previous | same outputs |")
    print("|---|---:|---:|---:|---|")
    for parts in (["q", "k", "v"], ["q", "v"]):
        models = {}
        for kind in ("previous", "current"):
            torch.manual_seed(0)
            model = vit("vit_tiny", img_size=32, patch_size=4, num_classes=10).to(device)
            petl = petlkit.attach(model, "lora", qkv_parts=parts).train()
            with torch.no_grad():  # non-zero B, as after training
                for p in petl.parameters():
                    if p.requires_grad:
                        p.add_(0.01 * torch.randn_like(p))
            if kind == "previous":
                for module in petl.modules():
                    if isinstance(module, LoRALinear):
                        module.forward = types.MethodType(previous_forward, module)
            models[kind] = petl
        with torch.no_grad():
            same = torch.allclose(models["previous"](x), models["current"](x), atol=1e-5)
        times: dict[str, list[float]] = {k: [] for k in models}
        for step in range(args.repeats + 2):
            for kind, petl in models.items():
                start = time.perf_counter()
                F.cross_entropy(petl(x), y).backward()
                sync(device)
                if step >= 2:
                    times[kind].append(time.perf_counter() - start)
        prev, cur = (statistics.median(times[k]) for k in ("previous", "current"))
        print(f"| {','.join(parts)} | {prev * 1e3:.0f} ms | {cur * 1e3:.0f} ms | "
              f"{cur / prev:.3f} | {same} |")  # fmt: skip


if __name__ == "__main__":
    main()
