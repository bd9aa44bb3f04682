"""Counts of every method on one shape, their predicted GPU time and memory, as tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from petlkit.errors import PetlError

from .cases import FLOOR, Case, build_case, count, method_model
from .counter import StepCount
from .fit import Fit, fit_ground_truth

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    name: str
    count: StepCount
    ms: float  # predicted H100 time


def default_methods() -> list[str]:
    from petlkit.registry import method_names

    return method_names()


def count_methods(case: Case, methods: list[str], kwargs: dict, dtype: torch.dtype, folded: bool,
                  fit: Fit, sources: bool = False) -> tuple[list[Row], list[str]]:  # fmt: skip
    """The floor and each method that applies to the case (unfolded, then folded where it
    folds); and a line per method that does not apply, saying why. `sources`: each call's
    source recorded (for `op_difference`'s table by source)."""
    floor = count(case, FLOOR, dtype=dtype, sources=sources)
    rows = [Row(FLOOR, floor, fit.predict_ms(floor.totals()))]
    skipped = []
    for method in methods:
        try:
            method_model(case, method, **kwargs)
        except PetlError as err:
            skipped.append(f"{method}: {err}")
            continue
        forms = [False, True] if folded and _folds(case, method, kwargs) else [False]
        for fold in forms:
            c = count(case, method, kwargs, dtype=dtype, fold=fold, sources=sources)
            label = f"{method} folded" if fold else method
            rows.append(Row(label, c, fit.predict_ms(c.totals())))
    return rows, skipped


def _folds(case: Case, method: str, kwargs: dict) -> bool:
    return method_model(case, method, **kwargs).fold_refusal() is None


def table(rows: list[Row]) -> str:
    floor = rows[0]
    lines = ["| method | ATen calls | ÷ floor | kernels | GEMM TFLOP | other GiB | predicted ms | "
             "÷ floor | peak GiB | ÷ floor | resident GiB | total GiB | saved GiB | syncs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        c = row.count
        lines.append(
            f"| {row.name} | {c.aten_calls:,} | {c.aten_calls / floor.count.aten_calls:.2f} | "
            f"{c.kernels:,} | {c.gemm_flops / 1e12:.2f} | {c.other_bytes / GIB:.1f} | "
            f"{row.ms:.1f} | {row.ms / floor.ms:.2f} | {c.peak_bytes / GIB:.2f} | "
            f"{c.peak_bytes / floor.count.peak_bytes:.2f} | {c.resident_bytes / GIB:.2f} | "
            f"{(c.resident_bytes + c.peak_bytes) / GIB:.2f} | {c.saved_bytes / GIB:.2f} | "
            f"{c.syncs} |"
        )
    return "\n".join(lines)


def _difference(ours: dict, theirs: dict) -> list[tuple[str, dict[str, int]]]:
    keys = ("calls", "kernels", "bytes")
    diff = {name: {k: ours.get(name, {}).get(k, 0) - theirs.get(name, {}).get(k, 0)
                   for k in keys} for name in ours.keys() | theirs.keys()}  # fmt: skip
    return [(name, d) for name, d in diff.items() if any(d.values())]


def op_difference(method: Row, floor: Row, top: int = 25) -> str:
    """The ops whose calls, kernels or bytes a method adds to (or removes from) the floor's;
    where sources were recorded, also the places that add them (forward functions, backward
    nodes)."""
    changed = _difference(method.count.by_op(), floor.count.by_op())
    by_bytes = sorted(changed, key=lambda item: (-abs(item[1]["bytes"]), -abs(item[1]["kernels"])))
    by_calls = sorted(changed, key=lambda item: (-abs(item[1]["calls"]), item[0]))
    tables = [("op", "bytes moved", by_bytes), ("op", "ATen calls", by_calls)]
    if any(op.source for op in method.count.ops):
        sources = _difference(method.count.by_source(), floor.count.by_source())
        ranked = sorted(sources, key=lambda item: (-abs(item[1]["calls"]), item[0]))
        tables.append(("source", "ATen calls, by source", ranked))
    lines = []
    for column, title, rows in tables:
        lines += ["" if lines else f"{method.name} − floor, by op:", f"top {top} by {title}:",
                  f"| {column} | calls | kernels | non-GEMM MiB |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for name, d in rows[:top]:
            lines.append(f"| {name} | {d['calls']:+,} | {d['kernels']:+,} | "
                         f"{d['bytes'] / 2**20:+,.0f} |")  # fmt: skip
    return "\n".join(lines)


def _check_names(methods: list[str] | None, ops: list[str] | None) -> None:
    """Refuse unknown method and row names before anything is counted."""
    from petlkit.registry import method_names

    known = method_names()
    for method in methods or []:
        if method not in known:
            raise PetlError(f"--methods {method!r} is not a method; valid: {known}")
    rows = {FLOOR, *(methods or known)}
    rows |= {f"{m} folded" for m in rows}
    for name in ops or []:
        if name not in rows:
            raise PetlError(f"--ops {name!r} names no row; rows: {FLOOR!r}, a counted method "
                            "or '<method> folded'")  # fmt: skip


def report(backbone: str, batch: int, size: int, methods: list[str] | None = None,
           kwargs: dict | None = None, dtype: str = "bf16", folded: bool = True,
           ops: list[str] | None = None) -> str:  # fmt: skip
    """The whole printout of `petlkit cost`."""
    _check_names(methods, ops)
    fit = fit_ground_truth()
    case = build_case(backbone, batch, size)
    rows, skipped = count_methods(case, methods or default_methods(), kwargs or {},
                                  DTYPES[dtype], folded, fit, sources=bool(ops))  # fmt: skip
    unit = "px" if case.family == "vision" else "tokens"
    out = [f"One training step of {backbone}, batch {batch}, {size} {unit}, {dtype} autocast, "
           "counted on fake tensors as a CUDA device would run it (AdamW, cross-entropy).",
           f"Predicted ms: H100 {fit.describe()} (fitted on ViT-B/16 b128; other shapes "
           "extrapolate). Peak: memory allocated during the step above what was allocated "
           "before it (resident: the parameters, buffers, optimiser state and batch); total: "
           "resident + peak, the most the step has allocated (torch.cuda.max_memory_allocated; "
           "the CUDA context and library workspaces come on top).", "", table(rows)]  # fmt: skip
    out += [f"not applicable: {line}" for line in skipped]
    by_name = {row.name: row for row in rows}
    for name in ops or []:
        if name not in by_name:
            raise PetlError(f"--ops {name!r} is not among the counted rows: {sorted(by_name)}")
        out += ["", op_difference(by_name[name], rows[0])]
    return "\n".join(out)
