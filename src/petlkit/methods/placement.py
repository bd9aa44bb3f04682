"""Where a method's tensors live and in which dtype: the one place that decides it.

The rule (docs/reliability.md, "Devices and dtypes"):
- A method builds its tensors on the CPU inside `attach` (so a seed gives the same initial adapter
  on every device); `place` then moves each of them onto the device of the weight it adapts: a
  wrapper's tensors go where its wrapped layer's weight is, the method's own tensors (SaS's shared
  pair, prompts, prefixes, gates) where the backbone's weights are.
- dtype: with `trained_dtype="float32"` (the default, as PEFT does) trained tensors are float32
  when the backbone is float16/bfloat16, and the backbone's dtype otherwise; `"backbone"` keeps the
  backbone's dtype; a torch dtype (or its name) is taken as it is. The task head is trained, so it
  follows the same policy, with hooks that keep the logits in the backbone's dtype.
- Forwards compute in the activations' dtype: `follow(t, x)` casts a parameter to x's device and
  dtype (a no-op when they already match), `CastLinear` does it for a method's own linears. So a
  method's output keeps the backbone's dtype, and gradients still reach float32 parameters.
  Inside the model's forward the trained parameters are cast once, all together
  (trained_casts.py).
- Per-forward tensors (indices, masks) are made from the input (`device=x.device`), never on the
  default device. Merge and unmerge work on the weights' own device (see Method.merge).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from petlkit.errors import ConfigError
from petlkit.methods.trained_casts import open_casts

if TYPE_CHECKING:
    from petlkit.methods.base import Method

TRAINED_DTYPES = ("float32", "backbone")
_LOW = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}  # fmt: skip


def follow(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` on x's device in x's dtype (the same tensor when it already is)."""
    return cast_to(t, x.dtype, x.device)


def cast_to(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`t` in `dtype` on `device` (the same tensor when it already is); a trained parameter
    comes from the forward's `TrainedCasts` when one is open (one cast for all of them)."""
    if t.dtype == dtype and t.device == device:
        return t
    casts = open_casts()
    if casts is not None:
        made = casts.lookup(t, dtype, device)
        if made is not None:
            return made
    return t.to(device=device, dtype=dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the linears reading `x` compute in: autocast's for x's device while it is on
    (a float32 layer-norm output is read in bf16 there), else x's own. A method that transforms a
    linear's input computes in it, so it adds no float32 activation pass and no cast of its own."""
    kind = x.device.type
    autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    if autocast and x.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _LastCast(threading.local):
    """The last input `compute_input` cast: source and result (weak references, so it keeps
    nothing alive) and the state the cast was made in."""

    source = result = key = None


_LAST = _LastCast()


def compute_input(x: torch.Tensor) -> torch.Tensor:
    """x in `compute_dtype(x)`, made once when several method parts read the same tensor (LoRA
    on q and on v, their gates and the prefix gate all read a block's input): the second reader
    gets the first one's cast, so the step casts and accumulates that activation once."""
    dtype = compute_dtype(x)
    if dtype == x.dtype:
        return x
    if torch.compiler.is_compiling():  # the compiler fuses the cast into its readers
        return x.to(dtype)
    key = (dtype, x._version, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    last = _LAST
    if last.source is not None and last.source() is x and last.key == key:
        made = last.result()
        if made is not None:
            return made
    made = x.to(dtype)
    last.source, last.result, last.key = weakref.ref(x), weakref.ref(made), key
    return made


def share_input_cast(module: nn.Module) -> None:
    """Make `module`, a linear beside a method's wrapped ones that reads their input (BERT's
    key beside LoRA's query and value), read it through `compute_input` too: autocast would cast
    that input once more for it, and its gradient once more back (issue #47). The same values
    either way; `unshare_input_cast` undoes it (one call per `share_input_cast`)."""
    readers = module.__dict__.get(_READERS, 0)
    if readers == 0:
        module.register_forward_pre_hook(read_shared_cast)
    module.__dict__[_READERS] = readers + 1


def unshare_input_cast(module: nn.Module) -> None:
    """Undo one `share_input_cast(module)`; the hook goes with the last."""
    readers = module.__dict__.get(_READERS, 0) - 1
    if readers > 0:
        module.__dict__[_READERS] = readers
        return
    module.__dict__.pop(_READERS, None)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is read_shared_cast:
            del module._forward_pre_hooks[key]


_READERS = "_petlkit_shared_cast_readers"


def read_shared_cast(module: nn.Module, args: tuple) -> tuple | None:
    """The pre-hook of `share_input_cast`: the module reads `compute_input` of its input."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return (compute_input(args[0]), *args[1:])


def cast_side_by_side(groups: list[list[torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Per group, `torch.cat(group).to(dtype)`: its tensors cast side by side along the first
    dim into one new tensor, with one foreach copy for all groups, where autocast casts each
    tensor alone (the frozen weights of linears computed as one GEMM, projections.py). Not
    differentiable: for tensors that are not trained."""
    wholes, pieces, sources = [], [], []
    for group in groups:
        first = group[0]
        rows = [t.shape[0] for t in group]
        whole = torch.empty((sum(rows), *first.shape[1:]), dtype=dtype, device=first.device)
        wholes.append(whole)
        pieces += whole.split(rows)
        sources += group
    torch._foreach_copy_(pieces, sources)
    return wholes


class CastLinear(nn.Linear):
    """An nn.Linear that computes in its input's dtype and device (its weights may be float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else follow(self.bias, x)
        return F.linear(x, follow(self.weight, x), bias)


def parse_dtype(value: str | torch.dtype) -> str | torch.dtype:
    """A trained-dtype policy: 'float32', 'backbone' or a floating torch dtype (or its name)."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(f"trained_dtype must be a floating dtype, got {value}")
        return value
    if value in TRAINED_DTYPES:
        return value
    if value in _DTYPE_NAMES:
        return _DTYPE_NAMES[value]
    raise ConfigError(
        f"trained_dtype {value!r} is not a policy or dtype; use one of {list(TRAINED_DTYPES)} or "
        f"a dtype name {sorted(_DTYPE_NAMES)}"
    )


def trained_dtype(weight_dtype: torch.dtype, policy: str | torch.dtype) -> torch.dtype:
    """The dtype a trained tensor gets next to a backbone weight of `weight_dtype`."""
    if isinstance(policy, torch.dtype):
        return policy
    if policy == "float32" and weight_dtype in _LOW:
        return torch.float32
    return weight_dtype


def anchor(module: nn.Module) -> torch.Tensor | None:
    """The first floating weight of `module` (through wrappers): where its adapter belongs."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _move(owner: nn.Module, skip: str, ref: torch.Tensor, policy) -> None:
    """Every parameter and buffer under `owner` (but not under its child `skip`) onto ref's
    device in the policy's dtype; parameters keep their identity where the tensor type allows."""
    dtype = trained_dtype(ref.dtype, policy)
    for prefix, module in owner.named_modules():
        if skip and (prefix == skip or prefix.startswith(skip + ".")):
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                want = dtype if tensor.is_floating_point() else tensor.dtype
                if tensor.device == ref.device and tensor.dtype == want:
                    continue
                moved = tensor.data.to(device=ref.device, dtype=want)
                if torch._has_compatible_shallow_copy_type(tensor, moved):
                    tensor.data = moved
                elif isinstance(tensor, nn.Parameter):  # e.g. to or from `meta`
                    store[name] = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                else:
                    store[name] = moved


def backbone_anchor(model: nn.Module) -> torch.Tensor:
    from petlkit.methods.base import backbone_parameters

    for tensor in backbone_parameters(model).values():
        if tensor.is_floating_point():
            return tensor
    raise ConfigError(f"{type(model).__name__} has no floating-point weights to adapt")


def place(method: Method, model: nn.Module, policy: str | torch.dtype = "float32") -> None:
    """Move every tensor `method` owns next to the weights it adapts, in the policy's dtype.

    Full fine-tuning trains the backbone's own weights: they stay as they are; its kept copies
    of the pretrained weights follow them."""
    ref = backbone_anchor(model)
    if not method.trains_backbone:
        _move(method, "", ref, policy)
    else:
        _move(method, "", ref, "backbone")
    for _, tuner in method.tuners(model):
        local = anchor(tuner.base_layer)
        _move(tuner, "base_layer", ref if local is None else local, policy)


def place_head(head: nn.Module, ref: torch.Tensor, policy: str | torch.dtype) -> None:
    """Give the (trained) head the policy's dtype; its logits keep the backbone's dtype."""
    _move(head, "", ref, policy)
    if getattr(head, "_petlkit_casts", False):
        return
    head.__dict__["_petlkit_casts"] = True

    def cast_in(module: nn.Module, args: tuple):
        weight = anchor(module)
        if weight is None or not args or not torch.is_tensor(args[0]):
            return None
        module.__dict__["_petlkit_out_dtype"] = args[0].dtype
        return (args[0].to(weight.dtype), *args[1:])

    def cast_out(module: nn.Module, args: tuple, output):
        dtype = module.__dict__.pop("_petlkit_out_dtype", None)
        if dtype is None or not torch.is_tensor(output) or torch.is_autocast_enabled():
            return None
        return output.to(dtype)

    head.register_forward_pre_hook(cast_in)
    head.register_forward_hook(cast_out)
