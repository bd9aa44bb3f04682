"""Step time from counts: time ≈ a·GEMM FLOPs + b·non-GEMM bytes + c·kernels, fitted to the GPU
ground truth (ground_truth.json: H100 times) on the counts of the code it was measured on
(calibration.json, written by benchmarks/cost_calibration.py).

The coefficients are non-negative (a cost can only add time) and found by non-negative least
squares; the fit's honesty is its leave-one-out error: each configuration predicted by the fit
of all the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
from scipy.optimize import nnls

# Feature: (StepCount attribute, unit it is read in).
FEATURES = {"gemm_flops": 1e12, "other_bytes": 2**30, "kernels": 1e3}
UNITS = {"gemm_flops": "ms per TFLOP", "other_bytes": "ms per GiB", "kernels": "ms per 1,000"}


def load(name: str) -> dict:
    return json.loads(resources.files("petlkit.cost").joinpath(name).read_text())


def features(counts: dict) -> np.ndarray:
    return np.array([counts[key] / unit for key, unit in FEATURES.items()])


@dataclass
class Fit:
    coefficients: np.ndarray  # one per feature, ms per unit
    rows: list[dict]  # {name, ms, predicted, loo} per configuration of the ground truth

    def predict_ms(self, counts: dict) -> float:
        return float(features(counts) @ self.coefficients)

    @property
    def loo_errors(self) -> np.ndarray:
        """|leave-one-out prediction - measured| / measured, per configuration."""
        return np.array([abs(r["loo"] - r["ms"]) / r["ms"] for r in self.rows])

    def describe(self) -> str:
        pairs = zip(FEATURES, self.coefficients, strict=True)
        terms = ", ".join(f"{c:.3g} {UNITS[k]}" for k, c in pairs)
        errors = 100 * self.loo_errors
        return (f"time fit on {len(self.rows)} H100 configurations: {terms}; leave-one-out "
                f"error {errors.mean():.1f} % mean, {errors.max():.1f} % worst")  # fmt: skip


def solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return nnls(x, y)[0]


def fit_ground_truth(truth: dict | None = None, calibration: dict | None = None) -> Fit:
    """The fit of the shipped ground truth on the shipped calibration counts."""
    truth = truth or load("ground_truth.json")
    calibration = calibration or load("calibration.json")
    rows = truth["vit_b16"]["rows"]
    x = np.stack([features(calibration["counts"][r["name"]]) for r in rows])
    y = np.array([r["ms"] for r in rows])
    coefficients = solve(x, y)
    out = []
    for i, row in enumerate(rows):
        keep = np.arange(len(rows)) != i
        loo = float(x[i] @ solve(x[keep], y[keep]))
        out.append({"name": row["name"], "ms": row["ms"], "gib": row["gib"],
                    "predicted": float(x[i] @ coefficients), "loo": loo})  # fmt: skip
    return Fit(coefficients, out)
