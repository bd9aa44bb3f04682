"""Importing this package registers every built-in method."""

from petlkit.methods import (  # noqa: F401
    adapter,
    bitfit,
    full,
    lora,
    prefix,
    prompt,
    sas,
    ssf,
    unipelt,
)
from petlkit.methods.base import Method, Tuner

__all__ = ["Method", "Tuner"]
