"""Metrics that need no network, accumulated batch by batch, for every task.

`evaluate.load("glue", "mrpc")` and even `evaluate.load("accuracy")` fetch scripts from the Hub,
so the usual metrics are built in. Any other name goes to `evaluate` (online, or a local path).

A metric scores decisions (class ids, the labels above their thresholds, predicted values) or,
where it says `needs_scores`, the probabilities themselves. A suite keeps decisions and labels
for the split it scores, and probabilities only when one of its metrics needs them: memory stays
bounded by one split, never by the logits of all evaluations. A new metric is one entry in
METRICS and one branch in compute_builtin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ftcli.errors import FtcliError
from ftcli.tasks import CLASSIFICATION, MULTI_LABEL, REGRESSION, SINGLE_LABEL


@dataclass(frozen=True)
class MetricSpec:
    tasks: tuple[str, ...]
    higher_is_better: bool = True
    needs_scores: bool = False  # computed from probabilities, not from decisions
    about: str = ""  # what it measures, for the config reference and the errors


METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec((SINGLE_LABEL,), about="share of examples whose class is right"),
    "f1": MetricSpec((SINGLE_LABEL,), about="F1 of class 1 with two classes, else the macro average"),
    "precision": MetricSpec((SINGLE_LABEL,), about="precision of class 1 with two classes, else macro"),
    "recall": MetricSpec((SINGLE_LABEL,), about="recall of class 1 with two classes, else macro"),
    "matthews": MetricSpec((SINGLE_LABEL,), about="Matthews correlation of true and predicted classes"),
    "roc_auc": MetricSpec(CLASSIFICATION, needs_scores=True, about="area under the ROC curve (one-vs-rest macro beyond two)"),
    "average_precision": MetricSpec(CLASSIFICATION, needs_scores=True, about="area under the precision-recall curve"),
    "log_loss": MetricSpec(CLASSIFICATION, higher_is_better=False, needs_scores=True, about="cross-entropy of the probabilities"),
    "brier": MetricSpec(CLASSIFICATION, higher_is_better=False, needs_scores=True, about="mean squared error of the probabilities"),
    "ece": MetricSpec(CLASSIFICATION, higher_is_better=False, needs_scores=True, about="expected calibration error, 15 bins"),
    "f1_micro": MetricSpec((MULTI_LABEL,), about="F1 over every (example, label) decision"),
    "f1_macro": MetricSpec((MULTI_LABEL,), about="mean of the labels' F1"),
    "f1_samples": MetricSpec((MULTI_LABEL,), about="mean of the examples' F1"),
    "precision_micro": MetricSpec((MULTI_LABEL,)),
    "precision_macro": MetricSpec((MULTI_LABEL,)),
    "recall_micro": MetricSpec((MULTI_LABEL,)),
    "recall_macro": MetricSpec((MULTI_LABEL,)),
    "subset_accuracy": MetricSpec((MULTI_LABEL,), about="share of examples whose labels are all right"),
    "hamming_loss": MetricSpec((MULTI_LABEL,), higher_is_better=False, about="share of wrong (example, label) decisions"),
    "pearson": MetricSpec((REGRESSION,), about="Pearson correlation of predicted and true values"),
    "spearman": MetricSpec((REGRESSION,), about="Spearman (rank) correlation of predicted and true values"),
    "mse": MetricSpec((REGRESSION,), higher_is_better=False, about="mean squared error"),
    "rmse": MetricSpec((REGRESSION,), higher_is_better=False, about="root mean squared error"),
    "mae": MetricSpec((REGRESSION,), higher_is_better=False, about="mean absolute error"),
    "r2": MetricSpec((REGRESSION,), about="coefficient of determination"),
}
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

    def __init__(self, names: list[str], num_labels: int, task: str = SINGLE_LABEL) -> None:
        self.names, self.num_labels, self.task = names, num_labels, task
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
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        self.per_label: dict[str, list[float]] = {}

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
            name: compute_builtin(name, decisions, references, self.num_labels, scores, self.task) for name in self._builtin
        }
        for metric in self._others:
            results |= metric.compute()
        if self.task == SINGLE_LABEL:
            self.confusion = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)
            np.add.at(self.confusion, (references.astype(int).reshape(-1), decisions.astype(int).reshape(-1)), 1)
        elif self.task == MULTI_LABEL and len(references):
            self.per_label = per_label_scores(decisions, references)
        return results


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def per_label_scores(decisions: np.ndarray, references: np.ndarray) -> dict[str, list[float]]:
    """Precision, recall, F1 and support (positives) of each label, in label order."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(references, decisions, average=None, zero_division=0.0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(), "support": support.tolist()}


def compute_builtin(
    name: str,
    predictions: np.ndarray,
    references: np.ndarray,
    num_labels: int = 2,
    scores: np.ndarray | None = None,
    task: str | None = None,
) -> float:
    """One built-in metric over a whole split. predictions: class ids (single_label), multi-hot
    rows (multi_label) or values (regression); scores: the probabilities, for metrics that need them."""
    if len(references) == 0:
        return float("nan")
    task = task or METRICS[name].tasks[0]
    if task == REGRESSION or name in ("pearson", "spearman"):
        return _regression(name, np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64))
    if METRICS[name].needs_scores:
        return _from_probabilities(name, scores, references, task)
    if task == MULTI_LABEL:
        return _multi_label(name, predictions, references)
    return _single_label(name, predictions, references, num_labels)


def _single_label(name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int) -> float:
    """GLUE's definitions: F1, precision and recall of the positive class (1) with two labels,
    their macro averages over the classes beyond two."""
    from sklearn import metrics as skm

    if name == "accuracy":
        return float(np.mean(predictions == references))
    if name in ("f1", "precision", "recall"):
        score = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[name]
        average = "binary" if num_labels == 2 else "macro"
        return float(score(references, predictions, average=average, zero_division=0.0))
    if name == "matthews":
        return float(skm.matthews_corrcoef(references, predictions))
    raise FtcliError(f"unknown metric '{name}'", f"built-in metrics: {', '.join(BUILTIN_METRICS)}")


def _multi_label(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    from sklearn import metrics as skm

    predictions, references = predictions.astype(int), references.astype(int)
    if name == "subset_accuracy":
        return float(np.mean(np.all(predictions == references, axis=1)))
    if name == "hamming_loss":
        return float(np.mean(predictions != references))
    kind, _, average = name.partition("_")
    score = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    return float(score(references, predictions, average=average, zero_division=0.0))


def _from_probabilities(name: str, scores: np.ndarray, references: np.ndarray, task: str) -> float:
    """roc_auc, average_precision, log_loss and brier, of one class against the rest (two classes:
    of class 1) and averaged over the classes or labels whose examples hold both outcomes."""
    from sklearn import metrics as skm

    if name == "ece":
        return expected_calibration_error(reliability(scores, references, task))
    if task == SINGLE_LABEL:
        truth = np.eye(scores.shape[1])[references.astype(int)]
        if scores.shape[1] == 2 and name in ("roc_auc", "average_precision", "brier"):
            truth, scores = truth[:, 1:], scores[:, 1:]  # binary: the positive class, as sklearn and GLUE score it
    else:
        truth = references.astype(float)
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    if name == "log_loss":
        if task == SINGLE_LABEL:
            return float(-np.mean(np.log(clipped[np.arange(len(references)), references.astype(int)])))
        return float(-np.mean(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)))
    if name == "brier":
        squared = (scores - truth) ** 2
        return float(np.mean(squared.sum(axis=1) if task == SINGLE_LABEL and truth.shape[1] > 1 else squared))
    score = {"roc_auc": skm.roc_auc_score, "average_precision": skm.average_precision_score}[name]
    defined = [column for column in range(truth.shape[1]) if 0 < truth[:, column].sum() < len(truth)]
    if not defined:
        return float("nan")
    return float(np.mean([score(truth[:, column], scores[:, column]) for column in defined]))


CALIBRATION_BINS = 15


def reliability(scores: np.ndarray, references: np.ndarray, task: str, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """The reliability diagram's data, in equal-width bins of confidence: each bin's count, mean
    confidence and how often its predictions were right. single_label: the top class's probability
    against whether it was the true class; multi_label: every label's probability against its outcome."""
    scores = np.asarray(scores, dtype=np.float64)
    if task == SINGLE_LABEL:
        confidence = scores.max(axis=1)
        correct = (scores.argmax(axis=1) == np.asarray(references).astype(int)).astype(float)
    else:
        confidence, correct = scores.reshape(-1), np.asarray(references, dtype=np.float64).reshape(-1)
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


def _regression(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    predictions, references = predictions.reshape(-1), references.reshape(-1)
    error = predictions - references
    if name == "mse":
        return float(np.mean(error**2))
    if name == "rmse":
        return float(np.sqrt(np.mean(error**2)))
    if name == "mae":
        return float(np.mean(np.abs(error)))
    if name == "r2":
        spread = np.sum((references - references.mean()) ** 2)
        return float(1 - np.sum(error**2) / spread) if spread else 0.0
    # Correlations are undefined for constant input; report 0 rather than NaN, as GLUE does.
    if np.std(predictions) == 0 or np.std(references) == 0:
        return 0.0
    from scipy import stats

    if name == "pearson":
        return float(stats.pearsonr(predictions, references)[0])
    if name == "spearman":
        return float(stats.spearmanr(predictions, references)[0])
    raise FtcliError(f"unknown metric '{name}'", f"built-in metrics: {', '.join(BUILTIN_METRICS)}")
