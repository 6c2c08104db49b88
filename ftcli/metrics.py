"""Metrics that need no network, accumulated batch by batch, for every task.

`evaluate.load("glue", "mrpc")` and even `evaluate.load("accuracy")` fetch scripts from the Hub,
so the usual metrics are built in. Any other name goes to `evaluate` (online, or a local path).

A metric scores decisions (class ids, the labels above their thresholds, predicted values) or,
where it says `needs_scores`, the probabilities themselves. A suite keeps decisions and labels
for the split it scores, and probabilities only when one of its metrics needs them: memory stays
bounded by one split, never by the logits of all evaluations. A new metric is one entry in
its task's `metrics` and one branch in its task's `metric`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ftcli.errors import FtcliError
from ftcli import tasks
from ftcli.tasks import METRICS
from ftcli.tasks.scoring import CALIBRATION_BINS, expected_calibration_error


BUILTIN_METRICS = tuple(METRICS)


def metric_problem(name: str, task: str) -> str | None:
    """Why a built-in metric does not apply to `task`, or None when it does."""
    spec = METRICS[name]
    if task in spec.tasks:
        return None
    if name in ("pearson", "spearman"):
        return (
            f"metric '{name}' correlates predicted numbers with true ones: under task {task} it would score class ids; "
            "use it with task: regression (for classes: accuracy, f1, matthews, roc_auc)"
        )
    suited = ", ".join(other for other, other_spec in METRICS.items() if task in other_spec.tasks)
    return f"metric '{name}' is for task {' or '.join(spec.tasks)}, not {task}; task {task} has: {suited}"


def primary_metric(names: list[str]) -> str:
    """The key that picks the best model: the first built-in metric, else `loss` (lower is better)."""
    return next((name for name in names if name in METRICS), "loss")


def higher_is_better(name: str) -> bool:
    """Whether a larger value of this metric (or of `loss`) is better."""
    return name in METRICS and METRICS[name].higher_is_better


class Metric(Protocol):
    def add_batch(self, predictions: np.ndarray, references: np.ndarray) -> None: ...

    def compute(self) -> dict[str, float]: ...


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
    """All configured metrics of a task together: feed batches, then compute once. Computing also
    sets what evaluate prints beside the metrics for the examples fed since the last computation:
    `confusion` (single_label: a row per true class, a column per predicted one) or `per_label`
    (multi_label: precision, recall, F1 and support of each label)."""

    def __init__(self, names: list[str], num_labels: int | list[str], task: str = tasks.DEFAULT) -> None:
        """num_labels: how many classes or labels, or their names (which token_classification's
        entity metrics read)."""
        self.label_names = num_labels if isinstance(num_labels, list) else None
        self.names, self.task = names, task
        self.num_labels = len(num_labels) if isinstance(num_labels, list) else num_labels
        builtin = [name for name in names if name in METRICS]
        for name in builtin:
            if problem := metric_problem(name, task):
                raise FtcliError(problem, "change metrics in the config")
        self._builtin = builtin
        self._others: list[Metric] = [EvaluateMetric(name) for name in names if name not in METRICS]
        self.needs_scores = any(METRICS[name].needs_scores for name in builtin)
        self._decisions: list[np.ndarray] = []
        self._references: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self.confusion: np.ndarray | None = None
        self.per_label: dict[str, list[float]] | None = None

    @property
    def primary(self) -> str:
        """The metric that picks the best model: the first built-in one, else the loss."""
        return primary_metric(self.names)

    @property
    def greater_is_better(self) -> bool:
        return higher_is_better(self.primary)

    def add_batch(self, decisions: np.ndarray, references: np.ndarray, scores: np.ndarray | None = None) -> None:
        """decisions: predicted class ids, multi-hot labels or values; scores: the probabilities,
        kept only when a metric needs them."""
        self._decisions.append(np.asarray(decisions))
        self._references.append(np.asarray(references))
        if self.needs_scores:
            if scores is None:
                raise ValueError("these metrics need the probabilities")
            self._scores.append(np.asarray(scores, dtype=np.float64))
        for metric in self._others:
            metric.add_batch(decisions, references)

    def compute(self) -> dict[str, float]:
        decisions, references, scores = (_concatenate(parts) for parts in (self._decisions, self._references, self._scores))
        self._decisions, self._references, self._scores = [], [], []
        results = {
            name: compute_builtin(name, decisions, references, self.num_labels, scores, self.task, self.label_names)
            for name in self._builtin
        }
        for metric in self._others:
            results |= metric.compute()
        task = tasks.get(self.task)
        self.confusion = task.confusion(decisions, references, self.num_labels)
        self.per_label = task.per_label(decisions, references)
        return results


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """Batches as one array; rows of a tag per token, as long as each batch's longest, padded to
    the longest batch's with the label the metrics skip (-100)."""
    if not parts:
        return np.zeros(0)
    if parts[0].ndim == 2 and parts[0].dtype.kind == "i" and len({part.shape[1] for part in parts}) > 1:
        width = max(part.shape[1] for part in parts)
        parts = [np.pad(part, ((0, 0), (0, width - part.shape[1])), constant_values=-100) for part in parts]
    return np.concatenate(parts)


def compute_builtin(
    name: str,
    predictions: np.ndarray,
    references: np.ndarray,
    num_labels: int = 2,
    scores: np.ndarray | None = None,
    task: str | None = None,
    label_names: list[str] | None = None,
) -> float:
    """One built-in metric over a whole split. predictions: class ids (single_label), multi-hot
    rows (multi_label), values (regression) or rows of tag ids (token_classification, which reads
    label_names); scores: the probabilities, for metrics that need them."""
    if len(references) == 0:
        return float("nan")
    owner = tasks.get(task or METRICS[name].tasks[0])
    if name not in owner.metrics:  # a metric of another task (config refuses it), as that task computes it
        owner = tasks.get(METRICS[name].tasks[0])
    if owner.token_level:
        return owner.metric(name, predictions, references, num_labels, scores, names=label_names)
    return owner.metric(name, predictions, references, num_labels, scores)


def reliability(scores: np.ndarray, references: np.ndarray, task: str, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """The reliability diagram's data, in equal-width bins of confidence: each bin's count, mean
    confidence and how often its predictions were right (single_label: the top class's probability
    against whether it was the true class; multi_label: every label's probability against its outcome)."""
    return tasks.get(task).reliability(np.asarray(scores, dtype=np.float64), references, bins)


__all__ = ["BUILTIN_METRICS", "METRICS", "MetricSuite", "compute_builtin", "expected_calibration_error", "reliability"]
