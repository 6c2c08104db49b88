"""Error analysis of one split's predictions: where a model goes wrong and how sure it was.

Pure functions over arrays (scores, decisions, labels, losses, one row per example): the evaluate
command feeds them, the terminal and report.html show what they return. Every list of examples
names each by its row in the split, so the texts can be put beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftcli.tasks import MULTI_LABEL, REGRESSION

TOP = 20  # examples in each list; the terminal shows the first few


def error_analysis(
    task: str, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, losses: np.ndarray
) -> dict[str, Any]:
    """What went wrong, by task: per class (or label) scores and the most confused pairs, the most
    confident mistakes and the highest-loss examples; for regression, the residuals by target range."""
    highest_loss = [
        {"index": int(index), "loss": float(losses[index])} for index in np.argsort(-losses, kind="stable")[:TOP]
    ]
    if task == REGRESSION:
        return {"residuals": residuals_by_range(decisions, labels), "highest_loss": highest_loss}
    if task == MULTI_LABEL:
        return {"confident_mistakes": _multi_label_mistakes(label_names, scores, decisions, labels), "highest_loss": highest_loss}
    confusion = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
    np.add.at(confusion, (labels.astype(int), decisions.astype(int)), 1)
    return {
        "per_class": per_class(label_names, confusion),
        "confused_pairs": confused_pairs(label_names, confusion),
        "confident_mistakes": _single_label_mistakes(label_names, scores, decisions, labels),
        "highest_loss": highest_loss,
    }


def per_class(label_names: list[str], confusion: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class, from the confusion matrix (a row per true class)."""
    rows = []
    for index, name in enumerate(label_names):
        right = confusion[index, index]
        predicted, support = confusion[:, index].sum(), confusion[index].sum()
        precision = right / predicted if predicted else 0.0
        recall = right / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": name, "precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)})
    return rows


def confused_pairs(label_names: list[str], confusion: np.ndarray) -> list[dict[str, Any]]:
    """The (true, predicted) pairs of different classes, most frequent first."""
    pairs = [
        {"true": label_names[true], "predicted": label_names[predicted], "count": int(confusion[true, predicted])}
        for true in range(len(label_names))
        for predicted in range(len(label_names))
        if true != predicted and confusion[true, predicted]
    ]
    return sorted(pairs, key=lambda pair: -pair["count"])[:TOP]


def _single_label_mistakes(label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    wrong = np.flatnonzero(decisions != labels)
    confidence = scores[wrong, decisions[wrong].astype(int)]
    return [
        {"index": int(index), "true": label_names[int(labels[index])], "predicted": label_names[int(decisions[index])],
         "probability": float(probability)}
        for index, probability in sorted(zip(wrong, confidence), key=lambda pair: -pair[1])[:TOP]
    ]


def _multi_label_mistakes(label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """Wrong (example, label) decisions, the surest first: false positives by their probability,
    missed labels by one minus theirs."""
    rows, columns = np.nonzero(decisions != labels)
    sureness = np.where(decisions[rows, columns] == 1, scores[rows, columns], 1 - scores[rows, columns])
    order = np.argsort(-sureness, kind="stable")[:TOP]
    return [
        {"index": int(rows[at]), "label": label_names[columns[at]], "kind": "false positive" if decisions[rows[at], columns[at]] else "missed",
         "probability": float(scores[rows[at], columns[at]])}
        for at in order
    ]


def residuals_by_range(predictions: np.ndarray, targets: np.ndarray, bins: int = 5) -> list[dict[str, Any]]:
    """Regression: in equal-width ranges of the true value, how many examples, the mean residual
    (prediction - target: above 0 the model overestimates) and the mean absolute error."""
    predictions, targets = np.asarray(predictions, dtype=float).reshape(-1), np.asarray(targets, dtype=float).reshape(-1)
    edges = np.linspace(targets.min(), targets.max(), bins + 1)
    which = np.clip(np.digitize(targets, edges[1:-1], right=True), 0, bins - 1)
    residual = predictions - targets
    return [
        {"from": float(edges[index]), "to": float(edges[index + 1]), "count": int((which == index).sum()),
         "mean_residual": float(residual[which == index].mean()) if (which == index).any() else float("nan"),
         "mae": float(np.abs(residual[which == index]).mean()) if (which == index).any() else float("nan")}
        for index in range(bins)
    ]
