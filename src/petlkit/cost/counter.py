"""Counts one training step's ATen op stream, as a GPU would run it, without running it.

The step runs on fake tensors (`FakeTensorMode`: shapes, dtypes and storages, no data) under CPU
autocast, with CUDA autocast's casting policy imposed on top (`CudaAutocastPolicy`), so the op
stream is the one a CUDA device in bf16 would see. Every op is recorded: ATen calls, kernels
(calls that launch work: not views, not bare allocations), GEMM FLOPs, bytes read and written by
non-GEMM kernels, host synchronisations (ops whose result the host must read), and the live
storages, from which the step's peak memory follows. torch only: no petlkit import, so the
calibration can count an older petlkit with today's counter.
"""

from __future__ import annotations

import math
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes
FOREACH_TENSORS_PER_KERNEL = 48  # multi_tensor_apply's tensor lists (3-4 operands per tensor)
# Ops whose result the host reads: each one waits for the device to finish.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero,
            aten.equal, aten._unique2, aten.unique_consecutive, aten.repeat_interleave}  # fmt: skip
# Allocations and metadata: no kernel.
NO_KERNEL = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
             aten.new_empty_strided, aten.lift_fresh, aten.sym_size, aten.sym_stride,
             aten.sym_numel, aten.sym_storage_offset, aten.is_same_size, aten.set_,
             aten._has_compatible_shallow_copy_type, aten.resize_, aten._unsafe_view,
             aten._reshape_alias}  # fmt: skip
IGNORED = ("prim", "prims", "profiler")  # fake tensors' own ops, profiler marks: not the stream
# Indexing ops that, given a boolean (or uint8) mask, find its true positions first: a sync.
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _attention_flops(query: torch.Tensor, key: torch.Tensor, backward: bool) -> int:
    """Two matmuls forward (QK^T, PV), four backward, at 2 FLOPs a multiply-add."""
    *batch, lq, d = query.shape
    lk = key.shape[-2]
    return (8 if backward else 4) * math.prod(batch) * lq * lk * d


def gemm_flops(func, args, kwargs, out) -> int | None:
    """FLOPs of a matrix-multiply-like op (torch's own FLOP formulas, plus CPU attention), or
    None for any other op."""
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        return _attention_flops(args[0], args[1], backward=False)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return _attention_flops(args[1], args[2], backward=True)
    if packet is aten._addmm_activation:  # addmm with its activation in the GEMM's epilogue
        packet, kwargs = aten.addmm, {k: v for k, v in kwargs.items() if k != "use_gelu"}
    if packet in (aten.addmm_, aten.baddbmm_):  # into its own addend: the same GEMM
        packet = aten.addmm if packet is aten.addmm_ else aten.baddbmm
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    return None


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _touched_bytes(func, args, kwargs, out) -> int:
    """Bytes a kernel reads and writes: its tensor operands' and results' own elements. An
    `out=` argument is the result, written once (not also read)."""
    read = kwargs
    if kwargs:
        written = {a.name for a in func._schema.arguments if a.is_out}
        read = {k: v for k, v in kwargs.items() if k not in written}
    return sum(t.numel() * t.element_size() for t in _tensors((args, read, out)))


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _call(func, packet, args, kwargs):
    """The op's result. On fake tensors an op whose result's size depends on the data (the
    true positions of a mask) has no size to give; it is run as if every position were true,
    as `OpCounter._scalar` answers a host's test: the counted batches are all real tokens."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    try:
        return func(*args, **kwargs)
    except DynamicOutputShapeException:
        if packet is aten.nonzero:
            mask = args[0]
            return torch.empty(mask.numel(), mask.dim(), dtype=torch.long, device=mask.device)
        if packet is aten.masked_select:
            numel = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
            return args[0].new_empty(numel)
        if packet in MASK_INDEXING:
            return func(args[0], _all_true(args[1]), *args[2:], **kwargs)
        raise NotImplementedError(
            f"{packet}: its result's size depends on the data, which fake tensors do not hold; "
            "count this model with fake=False (a real CPU run), or leave the op out of the step"
        ) from None


def _all_true(indices: list) -> list:
    """Indices with each mask replaced by the positions it selects when all are true."""
    out = []
    for index in indices:
        if not _is_mask(index):
            out.append(index)
            continue
        ranges = [torch.arange(n, device=index.device) for n in index.shape]
        out += [grid.reshape(-1) for grid in torch.meshgrid(*ranges, indexing="ij")]
    return out


def _masked(out: tuple, mask) -> tuple:
    """A backward's results with those its output mask leaves out dropped: the fake (meta)
    kernel of batch norm's backward allocates the input's gradient even when not asked for,
    CUDA's (and CPU's) return none, and nothing is written or kept."""
    return tuple(o if wanted else None for o, wanted in zip(out, mask, strict=True))


@dataclass
class OpRecord:
    name: str
    kernels: int
    flops: int
    bytes: int
    source: str = ""  # where the call came from (`OpCounter(sources=True)`)


@dataclass
class StepCount:
    """What one step costs, op by op and in total."""

    ops: list[OpRecord] = field(default_factory=list)
    syncs: int = 0
    peak_bytes: int = 0  # the most allocated during the step, above what it began with
    saved_bytes: int = 0
    resident_bytes: int = 0  # held before the step: parameters, buffers, optimiser state, batch

    @property
    def aten_calls(self) -> int:
        return len(self.ops)

    @property
    def kernels(self) -> int:
        return sum(op.kernels for op in self.ops)

    @property
    def gemm_flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def other_bytes(self) -> int:
        """Bytes moved by kernels that are not GEMMs (the memory-bound part of a step)."""
        return sum(op.bytes for op in self.ops if not op.flops)

    def totals(self) -> dict[str, int]:
        return {"aten_calls": self.aten_calls, "kernels": self.kernels,
                "gemm_flops": self.gemm_flops, "other_bytes": self.other_bytes,
                "peak_bytes": self.peak_bytes, "saved_bytes": self.saved_bytes,
                "resident_bytes": self.resident_bytes, "syncs": self.syncs}  # fmt: skip

    def by_op(self) -> dict[str, dict[str, int]]:
        """Per op name: calls, kernels, GEMM FLOPs and other bytes."""
        table: dict[str, Counter] = {}
        for op in self.ops:
            row = table.setdefault(op.name, Counter())
            row.update(calls=1, kernels=op.kernels, flops=op.flops,
                       bytes=0 if op.flops else op.bytes)  # fmt: skip
        return {name: dict(row) for name, row in table.items()}

    def by_source(self) -> dict[str, dict[str, int]]:
        """Per source (see `call_source`): calls, kernels and other bytes."""
        table: dict[str, Counter] = {}
        for op in self.ops:
            row = table.setdefault(op.source, Counter())
            row.update(calls=1, kernels=op.kernels, bytes=0 if op.flops else op.bytes)
        return {name: dict(row) for name, row in table.items()}

    def stream(self) -> list[str]:
        return [op.name for op in self.ops]


def call_source() -> str:
    """Where the current ATen call comes from: in a backward, the autograd node that runs
    ("backward GroupedDownBackward": its gradient sums into the next node's inputs included); in
    a forward, the innermost petlkit function that made it ("methods/lora.py:forward"), else the
    innermost transformers or timm one, else the counted step's own loss and optimizer."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward {node.name()}"
    library = None
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if path.endswith("/petlkit/cost/step.py"):  # the step's own code: loss, optimizer
            return library or "step: loss and optimizer"
        if "/petlkit/cost/" in path:
            continue  # the counter's own frames, the CUDA casting policy's
        if "/petlkit/" in path:
            return f"{path.rsplit('/petlkit/', 1)[1]}:{frame.name}"
        if library is None and ("/transformers/" in path or "/timm/" in path):
            library = f"{path.rsplit('/', 1)[1]}:{frame.name}"
    return library or "elsewhere"


class OpCounter(TorchDispatchMode):
    """Records every op below autograd and autocast, and the storages alive at each moment."""

    def __init__(self, count: StepCount, sources: bool = False, host: frozenset[int] = frozenset()):
        super().__init__()
        self.count = count
        self.sources = sources  # record each call's source (call_source: a stack walk per call)
        self.host = host  # ids of tensors a CUDA run keeps on the host (multi-tensor AdamW's steps)
        self.live = 0
        self.seen: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in IGNORED or self.host and self._on_host(args, kwargs):
            return func(*args, **kwargs)  # not the stream, or host arithmetic: no kernel
        packet = func._overloadpacket
        if packet in SYNC_OPS or packet in MASK_INDEXING and any(map(_is_mask, args[1])):
            self.count.syncs += 1
            if packet in (aten._local_scalar_dense, aten.is_nonzero):
                return self._scalar(func, args)
        out = _call(func, packet, args, kwargs)
        if packet is aten.native_batch_norm_backward:
            out = _masked(out, kwargs.get("output_mask", args[-1]))
        self._record(func, packet, args, kwargs, out)
        return out

    def _on_host(self, args, kwargs) -> bool:
        operands = _tensors((args, kwargs))
        return bool(operands) and all(id(t) in self.host for t in operands)

    @staticmethod
    def _scalar(func, args):
        """The value when it is known (a real tensor, a fake constant); else True or 1: fake
        tensors hold no data, and the counted batches are all real tokens (a test such as
        "is the padding mask all ones?" holds)."""
        from torch._subclasses.fake_tensor import DataDependentOutputException

        try:
            return func(*args)
        except DataDependentOutputException:
            return True if args[0].dtype == torch.bool else 1

    def _record(self, func, packet, args, kwargs, out) -> None:
        flops = gemm_flops(func, args, kwargs, out)
        if func.is_view or packet in NO_KERNEL or not _tensors((args, kwargs, out)):
            kernels = 0  # views, allocations, and ops on no tensor at all (promote_types)
        elif packet.__name__.startswith(("_foreach_", "_fused_")):  # multi_tensor_apply
            kernels = math.ceil(len(args[0]) / FOREACH_TENSORS_PER_KERNEL)
        else:
            kernels = 1
        touched = _touched_bytes(func, args, kwargs, out) if kernels else 0
        source = call_source() if self.sources else ""
        self.count.ops.append(OpRecord(str(packet), kernels, flops or 0, touched, source))
        for t in _tensors(out):
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.seen:
            return
        self.seen.add(storage)
        size = -(-_storage_bytes(t) // BLOCK) * BLOCK
        self.live += size
        self.count.peak_bytes = max(self.count.peak_bytes, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size
