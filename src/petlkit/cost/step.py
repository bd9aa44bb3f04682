"""One training step, counted on fake tensors (or, to check the counter, on real ones).

The step is the one of the GPU ground truth: under autocast, `loss = cross_entropy(logits.float(),
labels)`, `loss.backward()` (as `petlkit train` runs it on one process: the trained parameters'
gradients filled by the node that casts them back), then AdamW (its fused form, as the trainer
steps CUDA tensors: train/optim.adamw) over the trained tensors and `zero_grad(set_to_none=True)`.
The ground truth was measured with PyTorch's default there, the multi-tensor form (its step
counts on the host), which `fused=False` counts: the fit reads the counts of that code and form
(calibration.json, `count_rows`), and no floor row has an optimiser. With nothing
trained it is the floor: forward and backward to the inputs. A warm-up step first, uncounted,
creates the optimiser's state and the lazily built caches of the model. torch only (see
counter.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .counter import BLOCK, OpCounter, StepCount
from .cuda_policy import CudaAutocastPolicy

Forward = Callable[[nn.Module, dict], torch.Tensor]


def to_fake(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replaces, in place, every parameter and buffer by a fake tensor of the same shape, dtype
    and requires_grad (tied tensors stay tied); the model keeps its structure and code."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(_fake(mode, p.detach()), p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = _fake(mode, b)
                module._buffers[name] = memo[id(b)]
    return model


def _fake(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """t as a fake tensor; one on the meta device (a model built without its weights) as a
    fake CPU tensor, so that CPU autocast acts on it as on the rest."""
    if t.is_meta:
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))
    return mode.from_tensor(t)


def _step(model, batch, labels, forward, optimizer, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = forward(model, batch).float()  # [batch, classes] or [batch, tokens, vocabulary]
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    with getattr(model, "accumulating_backward", contextlib.nullcontext)():  # as the trainer
        loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def count_step(model: nn.Module, batch: dict, labels: torch.Tensor, forward: Forward,
               dtype: torch.dtype = torch.bfloat16, fake: bool = True,
               sources: bool = False, fused: bool = True) -> StepCount:  # fmt: skip
    """Counts one training step of `model` (changed in place: pass a copy). Tensors in `batch`
    that require grad get their gradient (the floor's backward to the inputs). `sources`:
    record where each call comes from (counter.call_source). `fused`: AdamW's fused form, as
    the trainer steps CUDA tensors; False, PyTorch's default multi-tensor form, as the ground
    truth was measured (the calibration)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        to_fake(model, mode)
        batch = {k: _fake_input(v, mode) for k, v in batch.items()}
        labels = mode.from_tensor(labels)
    trained = [p for p in model.parameters() if p.requires_grad]
    form = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(trained, lr=1e-6, **form) if trained else None
    count = StepCount()
    with mode, CudaAutocastPolicy(), _no_fake_shortcuts():
        with OpCounter(StepCount()):  # warm-up; the counter answers the host's reads
            _step(model, batch, labels, forward, optimizer, dtype)
        for t in batch.values():
            if isinstance(t, torch.Tensor):
                t.grad = None
        count.resident_bytes = resident_bytes(model, [*batch.values(), labels], optimizer)
        host = frozenset()  # the multi-tensor form keeps its step counts on the host
        if optimizer is not None and not fused:
            host = frozenset(id(state["step"]) for state in optimizer.state.values())
        with OpCounter(count, sources=sources, host=host):
            _step(model, batch, labels, forward, optimizer, dtype)
        _count_saved(count, host, lambda: _step(model, batch, labels, forward, optimizer, dtype))
    return count


def resident_bytes(model: nn.Module, inputs: list, optimizer) -> int:
    """What the device holds before a step, each storage once, in the caching allocator's
    blocks: the model's parameters and buffers, the optimiser's state and the batch."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in inputs if isinstance(t, torch.Tensor)]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]  # fmt: skip
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-size // BLOCK) * BLOCK for size in storages.values())


@contextlib.contextmanager
def _no_fake_shortcuts():
    """transformers skips its data-dependent checks (e.g. "is the padding mask all ones?", a
    host read that decides between two attention paths) on fake tensors; a real run makes
    them, so the counted run must too."""
    utils = sys.modules.get("transformers.utils.import_utils")
    if utils is None or not hasattr(utils, "is_fake_tensor"):
        yield
        return
    original = utils.is_fake_tensor
    utils.is_fake_tensor = lambda x: False
    try:
        yield
    finally:
        utils.is_fake_tensor = original


def _fake_input(value, mode: FakeTensorMode):
    if not isinstance(value, torch.Tensor):
        return value
    return mode.from_tensor(value.detach()).requires_grad_(value.requires_grad)


def _count_saved(count: StepCount, host: frozenset[int], step: Callable[[], None]) -> None:
    """The bytes of step-made storages autograd saves for backward (each once), from one more
    step run apart: the hooks that see them change the op stream (autograd then detaches what
    a custom Function unpacks, and no longer what a node saves of its own output)."""
    counter = OpCounter(StepCount(), host=host)
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage in counter.seen and id(storage) not in saved:
            saved.add(id(storage))
            count.saved_bytes += storage.nbytes()
        return t

    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
