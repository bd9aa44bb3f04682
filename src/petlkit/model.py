"""PetlModel: a task model plus named method instances, with one place for freezing and counting."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petlkit.config import MethodConfig
from petlkit.errors import NotFoldableError, PetlError
from petlkit.families import ModelLayout
from petlkit.layout import head_names, layout_or_none, set_heads, use_layout
from petlkit.methods.base import Method
from petlkit.methods.placement import (
    backbone_anchor,
    parse_dtype,
    place,
    place_head,
)
from petlkit.methods.trained_casts import TrainedCasts
from petlkit.registry import make_config, method_class


@dataclass(frozen=True)
class ParameterCount:
    """Trainable parameters the way the field reports them: head counted apart."""

    trainable: int  # method parameters (and backbone weights for full fine-tuning), head excluded
    head: int
    backbone: int  # the pretrained backbone alone, head excluded

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.backbone if self.backbone else 0.0

    def __str__(self) -> str:
        return (
            f"trainable: {self.trainable:,} ({self.percent:.4f}% of the {self.backbone:,}-parameter"
            f" backbone) + head: {self.head:,}"
        )


class PetlModel(nn.Module):
    """Wraps a task model and the methods attached to it; the model's own forward is kept.

    trained_dtype: the dtype policy of trained tensors (methods/placement.py): 'float32' (default:
    float32 next to a float16/bfloat16 backbone), 'backbone', or a torch dtype.
    heads: names of modules trained in full beside the methods (PEFT's `modules_to_save`); None
    takes the model's task head (petlkit models: `head`; transformers: the modules outside the
    base model, such as `classifier` or `score`). A language-model head (and embeddings tied to
    it) stays frozen unless named here.
    layout: a ModelLayout for a model petlkit does not know (layout.py says where layouts
    come from)."""

    def __init__(
        self,
        model: nn.Module,
        trained_dtype: str | torch.dtype = "float32",
        heads: tuple[str, ...] | list[str] | None = None,
        layout: ModelLayout | None = None,
    ) -> None:
        super().__init__()
        if model.__dict__.get("_petlkit_attached", False):
            raise PetlError(
                f"this {type(model).__name__} already has petlkit methods attached by an earlier "
                "attach(); keep using the PetlModel it returned (petl.add_method(...), or "
                "petl.remove_method('default') first), or build a fresh model"
            )
        if layout is not None:
            use_layout(model, layout)
        set_heads(model, tuple(head_names(model) if heads is None else heads))
        model.__dict__["_petlkit_attached"] = True
        self.model = model
        self.trained_dtype = parse_dtype(trained_dtype)
        self.methods = nn.ModuleDict()
        self.active: list[str] = []
        self._casts = TrainedCasts(self._trained_parameters)  # one cast of them per forward
        self._cast_hooks: list = []

    # -- methods -----------------------------------------------------------------------------
    def add_method(self, config: MethodConfig, name: str = "default") -> Method:
        """Attach another method under `name` and make it the active one (`set_active` picks
        others); its tensors are placed on the model's device and dtype (placement.py)."""
        if name in self.methods:
            raise PetlError(
                f"a method named {name!r} is attached already; pick another name, or remove it "
                f"first with petl.remove_method({name!r})"
            )
        if not name.isidentifier():
            raise PetlError(f"method name {name!r} must be a Python identifier (e.g. 'task_a')")
        method = method_class(config.method)(config, name)
        try:
            with torch.device("cpu"):  # same initial values on every device, then placed
                method.attach(self.model)
        except PetlError as err:
            with contextlib.suppress(Exception):  # leave the model as it was
                method.detach(self.model)
            others = ", ".join(f"{n!r} ({m.config.method})" for n, m in self.methods.items())
            if not others:
                raise
            raise type(err)(
                f"{name!r} ({config.method}) cannot join {others} on this model: {err}"
            ) from err
        place(method, self.model, self.trained_dtype)
        layout = layout_or_none(self.model)
        shared = layout.shared_layers if layout is not None else None
        if shared and method.tuners(self.model) + list(method.parameters()):
            warnings.warn(f"{config.method} on {type(self.model).__name__}: {shared}", stacklevel=3)
        for head in self.heads():
            place_head(head, backbone_anchor(self.model), self.trained_dtype)
        self.methods[name] = method
        self.set_active(name)
        return method

    def remove_method(self, name: str) -> None:
        """Take method `name` out of the model, restoring the modules it wrapped."""
        method = self._get(name)
        if method.merged:
            method.unmerge(self.model)
        method.detach(self.model)
        del self.methods[name]
        self.active = [n for n in self.active if n != name]
        self._apply_trainability()

    def set_active(self, *names: str) -> None:
        """Apply and train only these methods; the others stay attached but bypassed."""
        for name in names:
            self._get(name)
        self._check_bypass(n for n in self.methods if n not in names)
        self.active = list(names)
        for name, method in self.methods.items():
            method.set_enabled(self.model, name in self.active)
        self._apply_trainability()

    def _check_bypass(self, names) -> None:
        """Refuse before anything changes when a method to bypass cannot be."""
        for name in names:
            reason = self.methods[name].disable_refusal()
            if reason is not None:
                raise PetlError(reason)

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Inside the block the model computes exactly the untouched backbone (+ head). A merged
        model is unmerged for the block (the original weights are kept) and merged again after."""
        self._check_bypass(self.methods)
        saved = list(self.active)
        merged = any(m.merged for m in self.methods.values())
        if merged:
            self.unmerge()
        for method in self.methods.values():
            method.set_enabled(self.model, False)
        try:
            yield
        finally:
            for name, method in self.methods.items():
                method.set_enabled(self.model, name in saved)
            if merged:
                self.merge()

    def _get(self, name: str) -> Method:
        if name not in self.methods:
            raise PetlError(f"no method named {name!r}; attached: {list(self.methods)}")
        return self.methods[name]

    def heads(self) -> list[nn.Module]:
        """The task-head modules trained beside the methods."""
        return [self.model.get_submodule(n) for n in head_names(self.model)]

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """Name (relative to the task model) → parameter of every trained head."""
        return {
            f"{h}.{n}": p
            for h in head_names(self.model)
            for n, p in self.model.get_submodule(h).named_parameters()
        }

    def _trained_parameters(self) -> list[nn.Parameter]:
        """The active methods' trained parameters (head excluded)."""
        methods = [self.methods[name] for name in self.active]
        return [p for method in methods for p in method.trainable(self.model).values()]

    def accumulating_backward(self):
        """A context for `loss.backward()`: the trained parameters' gradients are written into
        their `.grad` by the node that casts them back, not one accumulation per parameter
        (trained_casts.TrainedCasts; off with more than one process, where DDP hooks those). Not
        for `autograd.grad`, which must receive the gradients."""
        return self._casts.accumulating()

    def _sync_casts(self) -> None:
        """The casts' hooks are on the model while an active method is unmerged (a merged or
        bare model keeps no hook of petlkit's). They open before any method's own pre-hook on
        the model (SaS's hypernetworks, run once per forward there, read the casts too)."""
        self._casts.stale()
        wanted = any(not self.methods[name].merged for name in self.active)
        if wanted and not self._cast_hooks:
            self._cast_hooks = [
                self.model.register_forward_pre_hook(self._casts.begin, prepend=True),
                self.model.register_forward_hook(self._casts.end, always_call=True),
            ]
        elif not wanted:
            for handle in self._cast_hooks:
                handle.remove()
            self._cast_hooks = []

    def _apply_trainability(self) -> None:
        self._sync_casts()
        for p in self.parameters():
            p.requires_grad_(False)
        for name in self.active:
            for p in self.methods[name].trainable(self.model).values():
                p.requires_grad_(True)
        for p in self.head_parameters().values():
            p.requires_grad_(True)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The task model's own forward, with the active methods applied."""
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The task model's own `generate()` (transformers decoders and encoder-decoders), with
        the active methods applied; the KV cache is safe with every method."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise PetlError(f"{type(self.model).__name__} has no generate(); only transformers "
                            "language models generate")  # fmt: skip
        return generate(*args, **kwargs)

    # -- merge -------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold every active method into the backbone weights: plain modules, no overhead.

        Wrappers stacked on one layer fold inner (first attached) first; methods that fold into
        the linears others wrap (SaS) fold after them; unmerge undoes it in reverse."""
        for name in self.active:
            self.methods[name].check_mergeable()
        for name in self._merge_order():
            self.methods[name].merge(self.model)
        self._sync_casts()

    def unmerge(self) -> None:
        """Undo `merge()`: the original weights come back bit for bit."""
        for name in reversed(self._merge_order()):
            self.methods[name].unmerge(self.model)
        self._sync_casts()

    def _merge_order(self) -> list[str]:
        """Wrappers in attach order (inner first); then the methods that fold into the linears
        (SaS), last attached first: its transform is the one nearest the linear."""
        early = [n for n in self.active if not self.methods[n].merge_late]
        late = [n for n in self.active if self.methods[n].merge_late]
        return early + late[::-1]

    # -- folded training (methods/folding.py) -------------------------------------------------
    def fold_refusal(self) -> str | None:
        """None when every active method can train folded into the weights it adapts."""
        reasons = [
            f"{name!r} ({self.methods[name].config.method}): {reason}"
            for name in self.active
            if (reason := self.methods[name].fold_refusal(self.model)) is not None
        ]
        return "; ".join(reasons) if reasons else None

    @property
    def folded(self) -> bool:
        return any(self.methods[name].folded for name in self.active)

    def set_folded(self, folded: bool) -> None:
        """Train every active method with its update formed into the weights it adapts (True)
        or applied to the activations (False): the same function, another cost."""
        if folded:
            reason = self.fold_refusal()
            if reason is not None:
                raise NotFoldableError(f"cannot train folded: {reason}; train unfolded "
                                       "(fold: off)")  # fmt: skip
        for name in self.active:
            self.methods[name].set_folded(self.model, folded)

    # -- counting ----------------------------------------------------------------------------
    def trainable_parameters(self) -> ParameterCount:
        """The trainable parameters, the task head counted apart (as the field reports them)."""
        method_params = {
            id(p) for m in self.methods.values() for p in m.added_parameters(self.model).values()
        }
        heads = self.head_parameters().values()
        head_params = {id(p) for p in heads}
        backbone = sum(
            p.numel()
            for p in self.model.parameters()
            if id(p) not in method_params and id(p) not in head_params
        )
        trainable = sum(
            p.numel() for p in self.parameters() if p.requires_grad and id(p) not in head_params
        )
        head = sum(p.numel() for p in heads if p.requires_grad)
        return ParameterCount(trainable=trainable, head=head, backbone=backbone)

    def print_trainable_parameters(self) -> None:
        """Print `trainable_parameters()`."""
        print(self.trainable_parameters())


def is_timm_vit(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__module__.startswith("timm.") and cls.__name__ == "VisionTransformer"


def attach(
    model: nn.Module,
    config: MethodConfig | str,
    name: str = "default",
    *,
    trained_dtype: str | torch.dtype = "float32",
    heads: tuple[str, ...] | list[str] | None = None,
    layout: ModelLayout | None = None,
    **kwargs: Any,
) -> PetlModel:
    """Inject a method into `model` (a petlkit task model, a transformers model of a supported
    family, any model with a `layout`, or a PetlModel) and freeze everything else.

    `config` is a MethodConfig or a method name (then `kwargs` are its config fields). The
    method's tensors go where the weights they adapt are; `trained_dtype` is their dtype policy,
    `heads` the modules trained in full beside it and `layout` a ModelLayout for a model petlkit
    does not know (see PetlModel). Attach before or after moving the model: both give the same
    placement.

    A timm `VisionTransformer` is converted first (`petlkit.backbones.from_timm`: the same
    weights, outputs equal to timm's to 1e-5, on the model's device and dtype) and the returned
    PetlModel wraps the converted model: petlkit's ViT has the hook points that prompts, VPT and
    prefix tuning need, which timm's blocks do not. Use the returned model; the timm model
    passed in is left as it was.
    """
    if isinstance(config, str):
        config = make_config(config, **kwargs)
    elif kwargs:
        raise PetlError("pass config fields either in the config object or as kwargs, not both")
    if is_timm_vit(model):  # converted: see the docstring
        from petlkit.backbones.vit_weights import from_timm

        anchor = next(model.parameters())
        model = from_timm(model).to(device=anchor.device, dtype=anchor.dtype)
    if isinstance(model, PetlModel):
        if heads is not None or layout is not None:
            raise PetlError("heads= and layout= are set by the first attach(); not again")
        petl = model
    else:
        petl = PetlModel(model, trained_dtype, heads=heads, layout=layout)
    petl.add_method(config, name)
    return petl
