"""The open registry of methods: a name resolves to a Method class and its config class."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from petlkit.errors import ConfigError

if TYPE_CHECKING:
    from petlkit.config import MethodConfig
    from petlkit.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method available under `name` (its config's `method` too)."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ConfigError(f"method name {name!r} is already registered by {_METHODS[name]}")
        cls.config_cls.method = name
        _METHODS[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    """The names `attach` and `make_config` accept, sorted (built-in and registered methods)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {method_names()}") from None


def make_config(name: str, **kwargs: Any) -> MethodConfig:
    """`make_config("lora", r=4)` builds that method's validated config."""
    import dataclasses

    config_cls = method_class(name).config_cls
    valid = sorted(f.name for f in dataclasses.fields(config_cls))
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"{name} has no argument {unknown[0]!r}; valid arguments: {valid}")
    return config_cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """The validated config a `to_dict()` (or an adapter's `adapter_config.json`) describes; its
    `method` key names the method."""
    if "method" not in data:
        raise ConfigError(f"method config has no 'method' key; add one of {method_names()}")
    return method_class(data["method"]).config_cls.from_dict(data)
