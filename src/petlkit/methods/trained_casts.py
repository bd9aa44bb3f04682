"""The per-forward casts of a model's trained parameters: inside the model's forward every trained
parameter another dtype asks for (bf16 under autocast) is cast once, all together, and the
backward casts their gradients back together (issue #47: the cost of a cast per read, per block).
`placement.cast_to` reads the casts of the forward running now from here; nodes that read
parameters side by side declare it (`join`) and read them as one view (`side_by_side`); nodes that
compute trained parameters' gradients themselves give them to the backward (`hand_over`).
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
from torch import nn


class _Open(threading.local):
    casts: tuple = ()


_OPEN = _Open()


class TrainedCasts:
    """The low-precision copies of a model's trained parameters for one forward, made for all of
    them at once: the first parameter a forward asks for in another dtype (bf16 under autocast)
    casts every trained parameter on that device with one foreach copy, and the backward returns
    their gradients with one more, where casting each where it is read costs two kernels per
    parameter (an adapter's four, a LoRA pair's two, per block). Hooks on the model open the
    casts before its forward and drop them after (they carry autograd history). A parameter
    read outside the model's forward (activation checkpointing recomputes in the backward) or
    unknown to `trained` (listed again at the next forward) is cast where it is read, as before;
    a listed parameter a forward did not read is not cast by the next (the first layer of prefix
    tuning's reparameterisation reads a float32 input, and autocast casts its weights). Sharded
    (DTensor) parameters are never listed: FSDP swaps in their gathered copies itself. Copies and
    pickles start empty.

    Inside `accumulating()` (the trainer's `loss.backward()`, one process), the backward
    writes the gradients it casts back into the parameters' `.grad` itself (a fresh one as pieces
    of one allocation, an existing one by one foreach add) and hands autograd none: each
    parameter's gradient accumulation would otherwise cost an ATen call and an engine node of its
    own (issue #47: BERT-base waits on the host). Not for `autograd.grad` (it must receive the
    gradients), a double backward, more than one process (DDP hooks the accumulations), or a
    parameter with a tensor hook: those get theirs from autograd as usual."""

    def __init__(self, trained) -> None:
        self.trained = trained  # () -> the trained parameters, listed again when stale
        self.direct = False  # inside accumulating(): the backward fills .grad itself
        self._params: list[torch.Tensor] | None = None
        self._tables: dict = {}
        self._read: set[int] = set()  # the listed parameters this forward read
        self._missed = False  # this forward read a trained parameter that was not listed
        self._joins: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}  # see `join`
        self._rejoin = False  # a join was declared since the parameters were ordered
        self.forward = object()  # a token of the forward running now (a new one per forward)

    def __getstate__(self) -> dict:
        return {"trained": self.trained}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["trained"])

    def __deepcopy__(self, memo: dict) -> TrainedCasts:
        return TrainedCasts(copy.deepcopy(self.trained, memo))

    @contextlib.contextmanager
    def accumulating(self):
        """Marks a backward that accumulates into `.grad` (`loss.backward()`), so that the cast
        node fills the trained parameters' gradients itself (class docstring)."""
        before, self.direct = self.direct, not distributed()  # DDP hooks the accumulations
        try:
            yield
        finally:
            self.direct = before

    def stale(self) -> None:
        """The trained parameters changed (a method added, removed or switched): list again."""
        self._params, self._joins = None, {}

    def join(self, params: tuple[torch.Tensor, ...]) -> None:
        """`params` are read side by side by one node (`side_by_side`): from the next forward on,
        their copies are cast next to each other, in this order, so the node reads them as one
        tensor without a copy."""
        key = tuple(id(p) for p in params)
        if key not in self._joins:
            self._joins[key] = params
            self._rejoin = True

    def begin(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():  # the compiler fuses each cast into its reader
            return
        self._tables, self._read, self._missed = {}, set(), False
        self.forward = object()
        _OPEN.casts = (*_OPEN.casts, self)

    def end(self, module: nn.Module, args: tuple, output) -> None:
        if torch.compiler.is_compiling():
            return
        if self._missed:  # a trained parameter that was not listed: list them all again
            self._params = None
        elif self._tables and self._params:  # the next forward casts only what this one read
            self._params = [p for p in self._params if id(p) in self._read]
        if self._rejoin and self._params:
            self._params = _in_join_order(self._params, self._joins.values())
        self._rejoin = False
        self._tables, self._read, self._missed = {}, set(), False
        _OPEN.casts = tuple(c for c in _OPEN.casts if c is not self)

    def lookup(self, t: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """t in `dtype` on `device` from this forward's casts, or None (not a listed one)."""
        key = (dtype, device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        table = self._tables.get(key)
        if table is None:
            if self._params is None:
                listed = [p for p in self.trained() if p.is_floating_point()]
                listed = _in_join_order(listed, self._joins.values())
                self._params = [] if any(sharded(p) for p in listed) else listed
            table = self._tables[key] = self._cast_all(dtype, device)
        made = table.get(id(t))
        if made is None:
            if isinstance(t, nn.Parameter) and t.requires_grad and self._params:
                self._missed = True
            return None
        self._read.add(id(t))
        return made[1]

    def _cast_all(self, dtype: torch.dtype, device: torch.device) -> dict:
        params = [p for p in self._params
                  if p.device == device and p.dtype != dtype and p.requires_grad]  # fmt: skip
        if not params:
            return {}
        made = _CastAll.apply(self, dtype, *params)
        return {id(p): (p, m) for p, m in zip(params, made, strict=True)}


def _in_join_order(params: list[torch.Tensor], joins) -> list[torch.Tensor]:
    """`params` with the members of each join (`TrainedCasts.join`) side by side, in the join's
    order, where its first member stood; a join with a member missing is left as it is."""
    of: dict[int, tuple[torch.Tensor, ...]] = {}
    for members in joins:
        for p in members:
            of.setdefault(id(p), members)
    if not of:
        return params
    present = {id(p) for p in params}
    ordered, placed = [], set()
    for p in params:
        if id(p) in placed:
            continue
        members = of.get(id(p))
        whole = members is not None and all(id(q) in present and id(q) not in placed
                                            for q in members)  # fmt: skip
        for q in members if whole else (p,):
            ordered.append(q)
            placed.add(id(q))
    return ordered


def join(params: tuple[torch.Tensor, ...]) -> None:
    """Declares that one node reads these trained parameters side by side (`side_by_side`),
    to the casts of the forward running now (nothing outside one)."""
    casts = open_casts()
    if casts is not None:
        casts.join(params)


def side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` along the first dim; a view, with no copy, where they are contiguous
    pieces of one storage one after the other (the casts lay joined parameters out so). For a
    node's forward, where autograd does not record the view."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    if first.is_contiguous() and first.numel() > 0:
        storage, at = first.untyped_storage()._cdata, first.storage_offset()
        for t in tensors:
            if (t.untyped_storage()._cdata != storage or t.storage_offset() != at
                    or not t.is_contiguous() or t.shape[1:] != first.shape[1:]
                    or t.dtype != first.dtype):  # fmt: skip
                return torch.cat(tensors)
            at += t.numel()
        shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        return first.as_strided(shape, strides)
    return torch.cat(tensors)


class _CastAll(torch.autograd.Function):
    """Tensors cast to `dtype` by one foreach copy, their gradients cast back by one."""

    @staticmethod
    def forward(ctx, casts: TrainedCasts, dtype: torch.dtype,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        ctx.set_materialize_grads(False)  # an unused copy's gradient stays None, not zeros
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.casts, ctx.params = casts, tensors  # leaves: referenced, not saved
        made = empty_alike(tensors, [dtype] * len(tensors))
        torch._foreach_copy_(made, list(tensors))
        return tuple(made)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        used = [i for i, g in enumerate(grads) if g is not None]
        back = empty_alike([grads[i] for i in used], [ctx.dtypes[i] for i in used])
        if used:
            torch._foreach_copy_(back, [grads[i] for i in used])
        out: list[torch.Tensor | None] = [None] * len(grads)
        for i, g in zip(used, back, strict=True):
            out[i] = g
        if ctx.casts.direct and not torch.is_grad_enabled():  # not a double backward
            _fill_grads(ctx.params, out)
        return (None, None, *out)


def open_casts() -> TrainedCasts | None:
    """The `TrainedCasts` of the forward running now (None outside one, or when compiling): a
    node that computes trained parameters' gradients in their own dtype keeps it for
    `hand_over` in its backward."""
    if not _OPEN.casts or torch.compiler.is_compiling():
        return None
    return _OPEN.casts[-1]


def forward_token() -> object | None:
    """A token of the model's forward running now (a new one per forward; None outside one):
    what a method makes once per forward for all its sites keys on it."""
    casts = open_casts()
    return None if casts is None else casts.forward


def hand_over(
    casts: TrainedCasts | None, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Gradients a node computed for trained parameters themselves (not their cast copies),
    written into `.grad` as the cast node writes its own when the backward accumulates
    (`TrainedCasts.accumulating`); what is left (None where written) goes to autograd."""
    grads = list(grads)
    if casts is not None and casts.direct and not torch.is_grad_enabled():
        _fill_grads(params, grads)
    return grads


def _fill_grads(params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None]) -> None:
    """Each gradient in `grads` accumulated into its parameter's `.grad` and replaced by None
    (autograd then has nothing to accumulate; its post-accumulation hooks still run, after),
    but for parameters with tensor hooks."""
    fresh, old, onto = [], [], []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None or p._backward_hooks:  # a tensor hook must receive (and may change) it
            continue
        if p.grad is None:
            fresh.append((p, g))
        else:
            old.append(p.grad)
            onto.append(g)
        grads[i] = None
    for p, g in fresh:
        p.grad = g
    if old:
        torch._foreach_add_(old, onto)


def empty_alike(tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """An uninitialised tensor of each one's shape and strides (so that a foreach copy between
    them is one fused launch on CUDA) in `dtypes[i]`. The contiguous ones of a device, dtype and
    shape past the first dim (biases and scales; LoRA's A of every site, its B of every site)
    are pieces of one allocation, split off along the first dim by one call, where each alone
    costs a call of its own (issue #47: BERT-base waits on the host)."""
    made: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, (t, dtype) in enumerate(zip(tensors, dtypes, strict=True)):
        if t.dim() >= 1 and t.is_contiguous():
            groups.setdefault((t.device, dtype, t.shape[1:]), []).append(i)
        else:
            made[i] = torch.empty_like(t, dtype=dtype)
    for (device, dtype, rest), members in groups.items():
        if len(members) == 1:
            made[members[0]] = torch.empty_like(tensors[members[0]], dtype=dtype)
            continue
        sizes = [tensors[i].shape[0] for i in members]
        whole = torch.empty(sum(sizes), *rest, dtype=dtype, device=device)
        for i, piece in zip(members, whole.split(sizes), strict=True):
            made[i] = piece
    return made


def distributed() -> bool:
    """More than one process: DDP's reducer hooks each parameter's gradient accumulation, and
    FSDP frees and refills gathered parameters between uses."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sharded(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed has no sharded tensors
        return False
    return isinstance(t, DTensor)
