"""Metrics per task kind, from scikit-learn and SciPy. Each returns {name: value}, the first entry
being the score model selection uses (as the GLUE leaderboard does for each task)."""

from __future__ import annotations

import math

import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels.numpy(), pred.numpy()))}


def f1_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """MRPC, QQP: F1 of the positive class, then accuracy."""
    return {
        "f1": float(f1_score(labels.numpy(), pred.numpy())),
        "accuracy": float(accuracy_score(labels.numpy(), pred.numpy())),
    }


def macro_f1(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Domain and sentiment tasks: F1 averaged over classes, then accuracy."""
    return {
        "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro")),
        "accuracy": float(accuracy_score(labels.numpy(), pred.numpy())),
    }


def mcc(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """CoLA: Matthews correlation."""
    return {"mcc": float(matthews_corrcoef(labels.numpy(), pred.numpy()))}


def correlation(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """STS-B and other regression: Pearson and Spearman correlation."""
    p, y = pred.double().numpy(), labels.double().numpy()
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}


METRICS = {
    "accuracy": accuracy,
    "f1_accuracy": f1_accuracy,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "correlation": correlation,
}


LOWER_IS_BETTER = frozenset({"perplexity"})


def selection_value(scores: dict[str, float]) -> float:
    """The number model selection maximises: a split's first metric; for perplexity, minus its
    logarithm (minus the mean token loss), which orders runs as perplexity does, lowest best."""
    name, value = next(iter(scores.items()))
    return -math.log(value) if name in LOWER_IS_BETTER else value
