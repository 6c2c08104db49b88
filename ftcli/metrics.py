"""Metrics that need no network: GLUE's definitions, accumulated batch by batch.

`evaluate.load("glue", "mrpc")` and even `evaluate.load("accuracy")` fetch scripts from the Hub,
so the usual metrics are built in. Any other name goes to `evaluate` (online, or a local path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from ftcli.config import BUILTIN_METRICS
from ftcli.errors import FtcliError


class Metric(Protocol):
    def add_batch(self, predictions: np.ndarray, references: np.ndarray) -> None: ...

    def compute(self) -> dict[str, float]: ...


class BuiltinMetric:
    """Keeps only the predicted and true label ids (two ints per example), never logits."""

    def __init__(self, name: str, num_labels: int = 2) -> None:
        if name not in BUILTIN_METRICS:
            raise FtcliError(f"unknown metric '{name}'", f"built-in metrics: {', '.join(BUILTIN_METRICS)}")
        self.name = name
        self.num_labels = num_labels
        self._predictions: list[np.ndarray] = []
        self._references: list[np.ndarray] = []

    def add_batch(self, predictions: np.ndarray, references: np.ndarray) -> None:
        self._predictions.append(np.asarray(predictions).reshape(-1))
        self._references.append(np.asarray(references).reshape(-1))

    def compute(self) -> dict[str, float]:
        predictions = np.concatenate(self._predictions) if self._predictions else np.zeros(0, dtype=int)
        references = np.concatenate(self._references) if self._references else np.zeros(0, dtype=int)
        self._predictions, self._references = [], []
        return {self.name: compute_builtin(self.name, predictions, references, self.num_labels)}


CLASS_SCORES = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}


def compute_builtin(name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int = 2) -> float:
    """GLUE's definitions: F1, precision and recall of the positive class (1) with two labels, their
    macro averages over the classes beyond two."""
    if len(references) == 0:
        return float("nan")
    if name == "accuracy":
        return float(np.mean(predictions == references))
    if name in CLASS_SCORES:
        average = "binary" if num_labels == 2 else "macro"
        return float(CLASS_SCORES[name](references, predictions, average=average, zero_division=0.0))
    if name == "matthews":
        return float(skm.matthews_corrcoef(references, predictions))
    # Correlations are undefined for constant input; report 0 rather than NaN, as GLUE does.
    if np.std(predictions) == 0 or np.std(references) == 0:
        return 0.0
    if name == "pearson":
        return float(stats.pearsonr(predictions, references)[0])
    if name == "spearman":
        return float(stats.spearmanr(predictions, references)[0])
    raise FtcliError(f"unknown metric '{name}'", f"built-in metrics: {', '.join(BUILTIN_METRICS)}")


class EvaluateMetric:
    """Any `evaluate` module: a Hub id such as glue/mrpc (config after the slash) or a local path."""

    def __init__(self, name: str) -> None:
        import evaluate  # imported lazily: it is slow and only needed for non-built-in names

        path, _, config_name = name.partition("/")
        if "/" in name and not Path(name).exists():
            args: tuple[str, ...] = (path, config_name)
        else:
            args = (name,)
        try:
            self._module = evaluate.load(*args)
        except Exception as error:  # evaluate raises many kinds; all mean "not loadable here"
            raise FtcliError(
                f"metric '{name}' could not be loaded through evaluate ({type(error).__name__})",
                f"offline, use the built-in metrics: {', '.join(BUILTIN_METRICS)}",
            ) from None
        self.name = name

    def add_batch(self, predictions: np.ndarray, references: np.ndarray) -> None:
        self._module.add_batch(predictions=predictions, references=references)

    def compute(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._module.compute().items()}


class MetricSuite:
    """All configured metrics together: feed label ids batch by batch, then compute once. Computing
    also sets `confusion`, the counts of the examples fed since the previous computation: a row per
    true label, a column per predicted one."""

    def __init__(self, names: list[str], num_labels: int) -> None:
        self.names = names
        self._metrics: list[Metric] = [
            BuiltinMetric(name, num_labels) if name in BUILTIN_METRICS else EvaluateMetric(name) for name in names
        ]
        self._counts = np.zeros((num_labels, num_labels), dtype=np.int64)
        self.confusion = self._counts.copy()

    @property
    def primary(self) -> str:
        """The metric that picks the best model: the first built-in one, else the loss."""
        return primary_metric(self.names)

    @property
    def greater_is_better(self) -> bool:
        return self.primary != "loss"

    def add_batch(self, predictions: np.ndarray, references: np.ndarray) -> None:
        for metric in self._metrics:
            metric.add_batch(predictions, references)
        np.add.at(self._counts, (np.asarray(references).reshape(-1), np.asarray(predictions).reshape(-1)), 1)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for metric in self._metrics:
            results |= metric.compute()
        self.confusion, self._counts = self._counts, np.zeros_like(self._counts)
        return results


def primary_metric(names: list[str]) -> str:
    """The key that picks the best model: the first built-in metric, else `loss` (lower is better)."""
    return next((name for name in names if name in BUILTIN_METRICS), "loss")
