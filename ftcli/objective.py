"""The objective: the loss a model trains on, and what its outputs mean, for each task.

The one home of every loss. The loop's eager step, its CUDA-graph step, the trainer backend and
evaluation all call it, so a change here changes every path alike. Losses are sums over the
examples of a batch: the callers divide by the examples of an optimizer step, which is how the
loop keeps gradient accumulation and several processes exact. `real` marks the rows that are
examples (the graphed step fills a short last batch with empty slots that add nothing).

    scores(logits)     probabilities (single_label: softmax; multi_label: sigmoid per label) or values
    decide(scores)     class ids, the labels above their thresholds, or the values themselves, by
                       the rules of decisions.py (on the host, from tensors or numpy arrays)
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ftcli.config import Config
from ftcli.decisions import decide_multi_label, decide_single_label
from ftcli.errors import FtcliError
from ftcli.tasks import MULTI_LABEL, REGRESSION, SINGLE_LABEL

if TYPE_CHECKING:
    from ftcli.data.prepare import Prepared  # only annotations: the module imports datasets and transformers

log = logging.getLogger("ftcli")


class Objective(Protocol):
    """What every task's objective does; ftcli's code calls these and nothing task-specific."""

    task: str

    def to(self, device: torch.device) -> Objective:
        """The same objective with its tensors on `device` (moved once, not at every step)."""

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """The summed training loss of a batch's real rows (all rows when `real` is None)."""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed evaluation loss of a batch: never weighted."""

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's evaluation loss (error analysis ranks examples by it)."""

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities, or predicted values."""

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """The predictions, on the host."""

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return self.decide(self.scores(logits))

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """One row of logits per document from its windows' (long_text: window): the logits of the
        windows' mean probabilities (mean of sigmoids' max for multi_label; the mean value for
        regression), so that every other method scores documents as it scores examples."""

    def aggregate_labels(self, labels: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """Each document's label, from its windows' (which all carry it)."""
        first = torch.full((count,), len(documents), dtype=torch.long).scatter_reduce_(
            0, documents, torch.arange(len(documents)), "amin"
        )
        return labels[first]


def _on_host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.cpu().numpy()


def _mean_by(values: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
    totals = torch.zeros((count, *values.shape[1:]), dtype=values.dtype).index_add_(0, documents, values)
    windows = torch.zeros(count, dtype=values.dtype).index_add_(0, documents, torch.ones(len(documents), dtype=values.dtype))
    return totals / windows.clamp(min=1).reshape(-1, *([1] * (values.dim() - 1)))


class SingleLabelObjective(Objective):
    """Single-label classification: softmax cross-entropy, the training loss optionally weighted
    per class (training.class_weights) and smoothed (training.label_smoothing); evaluation scores
    the plain loss, so runs with and without them compare on it."""

    task = SINGLE_LABEL
    # A label the loss skips: the rows of a batch that are no examples get it.
    IGNORE = -100

    def __init__(
        self,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        decision_threshold: float | None = None,
    ) -> None:
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        # Two classes: the second is predicted when its probability reaches this; None: the larger one.
        self.decision_threshold = decision_threshold

    def to(self, device: torch.device) -> SingleLabelObjective:
        if self.class_weights is None:
            return self
        return SingleLabelObjective(self.class_weights.to(device), self.label_smoothing, self.decision_threshold)

    def with_decision_threshold(self, threshold: float | None) -> SingleLabelObjective:
        return SingleLabelObjective(self.class_weights, self.label_smoothing, threshold)

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        if real is not None:
            labels = torch.where(real, labels, self.IGNORE)
        return F.cross_entropy(
            logits.float(), labels, weight=self.class_weights, reduction="sum", ignore_index=self.IGNORE,
            label_smoothing=self.label_smoothing,
        )

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predicted class ids."""
        return decide_single_label(_on_host(scores), self.decision_threshold)

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        if self.decision_threshold is not None:
            return self.decide(self.scores(logits))
        return decide_single_label(_on_host(logits.float()))  # the logits' own order, without a softmax's rounding

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        return _mean_by(self.scores(logits), documents, count).clamp(min=1e-12).log()


class MultiLabelObjective(Objective):
    """Multi-label classification: each label yes or no, by a sigmoid and binary cross-entropy
    (averaged over the labels of an example), positives optionally weighted per label
    (pos_weight, training.class_weights); a label is predicted when its probability reaches its
    threshold."""

    task = MULTI_LABEL

    def __init__(self, pos_weight: torch.Tensor | None = None, thresholds: np.ndarray | float = 0.5) -> None:
        self.pos_weight = pos_weight
        self.thresholds = thresholds

    def to(self, device: torch.device) -> MultiLabelObjective:
        if self.pos_weight is None:
            return self
        return MultiLabelObjective(self.pos_weight.to(device), self.thresholds)

    def with_thresholds(self, thresholds: np.ndarray | float) -> MultiLabelObjective:
        return MultiLabelObjective(self.pos_weight, thresholds)

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        per_example = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), pos_weight=self.pos_weight, reduction="none"
        ).mean(-1)
        return _sum_of_real(per_example, real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.losses(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """One 0/1 row per example: the labels whose probability reaches their threshold."""
        return decide_multi_label(_on_host(scores), self.thresholds)

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """A label is in a document when some window has it: the highest of the windows' probabilities."""
        scores = self.scores(logits)
        where = documents[:, None].expand(-1, scores.shape[1])
        highest = torch.zeros(count, scores.shape[1]).scatter_reduce_(0, where, scores, "amax", include_self=False)
        return torch.logit(highest.clamp(1e-7, 1 - 1e-7))


class RegressionObjective(Objective):
    """Regression: the model's one output is the prediction, trained on the mean squared error
    (or the Huber loss) to the target; data.clip_predictions keeps predictions in data.label_range."""

    task = REGRESSION

    def __init__(self, loss: str = "mse", clip: tuple[float, float] | None = None) -> None:
        self.loss, self.clip = loss, clip

    def to(self, device: torch.device) -> RegressionObjective:
        return self

    def _per_example(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        predicted = logits.float().squeeze(-1)
        if self.loss == "huber":
            return F.huber_loss(predicted, labels.float(), reduction="none")
        return (predicted - labels.float()) ** 2

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return _sum_of_real(self._per_example(logits, labels), real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._per_example(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._per_example(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        values = logits.float().squeeze(-1)
        return values.clamp(*self.clip) if self.clip else values

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        return _on_host(scores)

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        return _mean_by(logits.float(), documents, count)


def _sum_of_real(per_example: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return (per_example * real).sum() if real is not None else per_example.sum()


def build_objective(config: Config, prepared: Prepared) -> Objective:
    """The objective config asks for on this data."""
    training = config.training
    if config.task == REGRESSION:
        clip = tuple(config.data.label_range) if config.data.clip_predictions else None
        return RegressionObjective(config.loss, clip)
    if config.task == MULTI_LABEL:
        fixed = config.thresholds if isinstance(config.thresholds, float) else 0.5
        return MultiLabelObjective(positive_weights(training.class_weights, prepared), fixed)
    return SingleLabelObjective(class_weights(training.class_weights, prepared), training.label_smoothing)


def check_fits_labels(config: Config, label_names: list[str]) -> None:
    """Options that need a given number of classes, checked as soon as the data names its classes
    (before tokenizing): decision_threshold decides between two, and with more would be ignored."""
    if config.task == SINGLE_LABEL and config.decision_threshold != 0.5 and len(label_names) > 2:
        shown = ", ".join(label_names[:4]) + (", ..." if len(label_names) > 4 else "")
        raise FtcliError(
            f"decision_threshold={config.decision_threshold} decides between two classes; the data has "
            f"{len(label_names)} ({shown})",
            "drop decision_threshold: with more classes the most probable one is predicted",
        )


def class_weights(setting: str | list[float] | None, prepared: Prepared) -> torch.Tensor | None:
    """The training loss's weight per class (label id order), from training.class_weights."""
    if setting is None:
        return None
    names = prepared.label_names
    if setting != "balanced":
        return torch.tensor(_one_per_label(setting, names), dtype=torch.float32)
    counts = prepared.summary["train"].label_counts
    missing = [name for name in names if not counts[name]]
    if missing:
        raise FtcliError(
            f"training.class_weights: balanced is undefined: label '{missing[0]}' has no training examples",
            "give training.class_weights as one weight per label",
        )
    total = sum(counts.values())
    return torch.tensor([total / (len(names) * counts[name]) for name in names], dtype=torch.float32)


def positive_weights(setting: str | list[float] | None, prepared: Prepared) -> torch.Tensor | None:
    """multi_label's pos_weight per label: balanced is negatives / positives in training; a label
    without a positive training example (a shortened training set) keeps weight 1."""
    if setting is None:
        return None
    names = prepared.label_names
    if setting != "balanced":
        return torch.tensor(_one_per_label(setting, names), dtype=torch.float32)
    positives, examples = prepared.summary["train"].label_counts, prepared.summary["train"].size
    missing = [name for name in names if not positives[name]]
    if missing:
        log.warning("class_weights balanced: %s without a positive training example keep weight 1", ", ".join(missing))
    return torch.tensor(
        [(examples - positives[name]) / positives[name] if positives[name] else 1.0 for name in names], dtype=torch.float32
    )


def _one_per_label(weights: list[float], names: list[str]) -> list[float]:
    if len(weights) != len(names):
        raise FtcliError(
            f"training.class_weights has {len(weights)} weights for {len(names)} labels ({', '.join(names)})",
            "give one weight per label, in data.label_names order, or use balanced",
        )
    return weights


def tune_thresholds(scores: np.ndarray, references: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Per label, the probability threshold that maximises that label's F1 on these examples
    (the smallest such one on ties); 0.5 for a label without a positive example here."""
    candidates = np.round(np.arange(0.01, 1.0, 0.01), 2) if candidates is None else candidates
    references = references.astype(bool)
    chosen = np.full(scores.shape[1], 0.5)
    for label in range(scores.shape[1]):
        truth = references[:, label]
        if not truth.any():
            continue
        predicted = scores[:, label][None, :] >= candidates[:, None]  # candidates x examples
        true_positives = (predicted & truth).sum(axis=1)
        f1 = 2 * true_positives / (predicted.sum(axis=1) + truth.sum())
        chosen[label] = candidates[int(np.argmax(f1))]
    return chosen


def fit_temperature(
    objective: Objective, logits: torch.Tensor, labels: torch.Tensor, documents: tuple[torch.Tensor, int] | None = None
) -> float:
    """The temperature T that makes softmax(logits / T) (or each label's sigmoid) fit the labels
    best: the one that minimises the evaluation loss, searched on a log scale within [0.05, 20]
    (temperature scaling, Guo et al. 2017). Dividing logits by a positive number keeps their
    order: the predicted classes stay what they were. documents: windows' (documents, count), whose
    per-document scores (objective.aggregate) the temperature is fitted to; labels are then the
    documents'."""
    from scipy.optimize import minimize_scalar

    logits = logits.float()

    def loss(log_temperature: float) -> float:
        scaled = logits / math.exp(log_temperature)
        if documents is not None:
            scaled = objective.aggregate(scaled, *documents)
        return float(objective.loss_sum(scaled, labels)) / max(len(labels), 1)

    found = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def tune_decision_threshold(second_class: np.ndarray, labels: np.ndarray, score) -> float:
    """The probability of the second class above which to predict it, maximising `score`
    (predictions, labels -> a number, larger better) over 0.01 .. 0.99; the one nearest 0.5 on ties."""
    candidates = np.round(np.arange(0.01, 1.0, 0.01), 2)
    values = np.array([score((second_class >= candidate).astype(int), labels) for candidate in candidates])
    best = np.flatnonzero(values == values.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def clip_scale(grad_norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies every gradient by (the eager steps
    clip through it): max_grad_norm / (norm + 1e-6), never above 1. The CUDA-graph step applies it
    to its flat gradient buffer in one kernel."""
    return (max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
