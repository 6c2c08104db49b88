"""Scores of probabilities that the tasks with classes share: the reliability diagram, the
expected calibration error, and the ranking metrics (roc_auc, average_precision) averaged over
the classes or labels whose examples hold both outcomes."""

from __future__ import annotations

import numpy as np

from ftcli.tasks.base import MetricSpec

CALIBRATION_BINS = 15
_WITH_CLASSES = ("single_label", "multi_label")
# The metrics of probabilities, which the tasks with classes share (each reads its truth its way).
PROBABILITY_METRICS = {
    "roc_auc": MetricSpec(_WITH_CLASSES, needs_scores=True, about="area under the ROC curve (one-vs-rest macro beyond two)"),
    "average_precision": MetricSpec(_WITH_CLASSES, needs_scores=True, about="area under the precision-recall curve"),
    "log_loss": MetricSpec(_WITH_CLASSES, higher_is_better=False, needs_scores=True, about="cross-entropy of the probabilities"),
    "brier": MetricSpec(_WITH_CLASSES, higher_is_better=False, needs_scores=True, about="mean squared error of the probabilities"),
    "ece": MetricSpec(_WITH_CLASSES, higher_is_better=False, needs_scores=True, about="expected calibration error, 15 bins"),
}


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """The reliability diagram's data, in equal-width bins of confidence: each bin's count, mean
    confidence and how often its predictions were right."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean = lambda values: np.bincount(which, weights=values, minlength=bins) / np.maximum(count, 1)  # noqa: E731
    return {"count": count.tolist(), "confidence": mean(confidence).tolist(), "accuracy": mean(correct).tolist()}


def expected_calibration_error(bins: dict[str, list]) -> float:
    """The bins' gaps between confidence and accuracy, weighted by their share of the examples."""
    count = np.asarray(bins["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(bins["confidence"]) - np.asarray(bins["accuracy"]))
    return float((count * gaps).sum() / max(count.sum(), 1))


def ranking(name: str, truth: np.ndarray, scores: np.ndarray) -> float:
    """roc_auc or average_precision of each column (one class against the rest, or one label),
    averaged over the columns whose examples hold both outcomes."""
    from sklearn import metrics as skm

    score = {"roc_auc": skm.roc_auc_score, "average_precision": skm.average_precision_score}[name]
    defined = [column for column in range(truth.shape[1]) if 0 < truth[:, column].sum() < len(truth)]
    if not defined:
        return float("nan")
    return float(np.mean([score(truth[:, column], scores[:, column]) for column in defined]))


def sklearn_score(kind: str, references: np.ndarray, predictions: np.ndarray, average: str) -> float:
    """F1, precision or recall, as sklearn computes them (0 where undefined)."""
    from sklearn import metrics as skm

    score = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    return float(score(references, predictions, average=average, zero_division=0.0))
