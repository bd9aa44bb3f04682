"""Method configurations: frozen dataclasses, validated on construction, serialised as JSON."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Self

from petlkit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses add fields with defaults and override `validate`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):  # JSON gives lists; keep configs hashable and immutable
                object.__setattr__(self, field.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values. Called after construction."""

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, `method` included (`config_from_dict` reads it back)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return {"method": self.method, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict: unknown keys are ignored with a warning, wrong ones raise."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields) - {"method"})
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown keys {unknown} (valid keys: {sorted(fields)})",
                stacklevel=2,
            )
        missing = [
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required keys {missing}; add them")
        return cls(**{k: v for k, v in data.items() if k in fields})


def check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}.{name} must be a positive integer, got {value!r}")


def check_finite(owner: str, name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{owner}.{name} must be > 0, got {value!r}")


def check_range(owner: str, name: str, value: Any, low: float, high: float) -> None:
    """A finite number in [low, high]: the bounds keep float32 training finite."""
    check_finite(owner, name, value)
    if not low <= value <= high:
        raise ConfigError(f"{owner}.{name} must be in [{low:g}, {high:g}], got {value!r}")


def check_probability(owner: str, name: str, value: Any) -> None:
    check_finite(owner, name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner}.{name} must be in [0, 1), got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")
