"""Choosing the modules a method acts on: exact-suffix lists or a full-match regex."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from petlkit.errors import TargetError

BASE = ".base_layer"


def canonical_name(name: str) -> str:
    """A module's name with wrapper levels removed, stable however many methods wrap it."""
    return name.replace(BASE, "")


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inside_a_method(model: nn.Module, name: str) -> bool:
    """True for modules a method added (an adapter's own linears, a gate), not the backbone's:
    the path passes through a wrapper (it has `base_layer`) other than by its `base_layer`."""
    module = model
    for part in name.split("."):
        if hasattr(module, "base_layer") and part != "base_layer":
            return True
        module = getattr(module, part)
    return False


def read_directly(model: nn.Module, name: str) -> bool:
    """True for layers whose parent reads their weights without calling them (the out_proj of
    nn.MultiheadAttention, as in SigLIP's pooling head): a wrapper there would never run."""
    parent, _, _ = name.rpartition(".")
    return isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)


def find_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    exclude_prefixes: Sequence[str] | None = None,
) -> list[str]:
    """Canonical names of the modules of `types` that `targets` selects (error if none); task
    and language-model heads are never candidates unless `exclude_prefixes` says otherwise."""
    if exclude_prefixes is None:
        from petlkit.layout import untargetable

        exclude_prefixes = untargetable(model)
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, types) or inside_a_method(model, name):
            continue
        if read_directly(model, name):
            continue
        canon = canonical_name(name)
        if any(canon == p or canon.startswith(p + ".") for p in exclude_prefixes):
            continue
        candidates.append(canon)
    chosen = [n for n in dict.fromkeys(candidates) if _matches(n, targets)]
    if not chosen:
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates})
        raise TargetError(
            f"target modules {targets!r} match no {'/'.join(t.__name__ for t in types)} in "
            f"{type(model).__name__}; candidates (name suffixes): {suffixes[:30]}"
        )
    return chosen


def get_slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module and attribute under which the (outermost wrapper of) `name` lives."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The innermost plain module at canonical `name`, looking through wrappers."""
    module = model.get_submodule(name)
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module
