"""Importing this package registers every built-in method."""

from petlkit.methods import adapter, bitfit, full, lora, sas  # noqa: F401
from petlkit.methods.base import Method, Tuner

__all__ = ["Method", "Tuner"]
