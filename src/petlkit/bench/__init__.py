"""Benchmark grids: presets, learning-rate selection on validation data, a resumable runner,
and reports (tables, ties, plots, the papers' claims)."""

from petlkit.bench.grid import Cell, cells, read_records, run_grid
from petlkit.bench.presets import PRESETS, MethodEntry, Preset, get_presets, narrowed
from petlkit.bench.report import write_report

__all__ = ["PRESETS", "Cell", "MethodEntry", "Preset", "cells", "get_presets", "narrowed",
           "read_records", "run_grid", "write_report"]  # fmt: skip
