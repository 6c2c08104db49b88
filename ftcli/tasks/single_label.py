"""single_label: one class per example (softmax, cross-entropy); with two classes a decision
threshold on the second class's probability."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.errors import FtcliError
import ftcli.tasks.labels as read
from ftcli.tasks.base import TOP, Decider, MetricSpec, Objective, Option, Task
from ftcli.tasks.scoring import CALIBRATION_BINS, PROBABILITY_METRICS, expected_calibration_error, ranking, reliability_bins, sklearn_score

if TYPE_CHECKING:
    import torch

NAME = "single_label"


def softmax(logits: np.ndarray) -> np.ndarray:
    """The class probabilities, along the last axis."""
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def decide_single_label(scores: np.ndarray, decision_threshold: float | None = None) -> np.ndarray:
    """Class ids: the highest score's (the first on ties), or with a threshold (two classes) the
    second class where its probability reaches the threshold."""
    if decision_threshold is None:
        return scores.argmax(-1)
    # In the scores' precision, as torch compares a tensor with a Python number.
    return (scores[:, 1] >= np.asarray(decision_threshold, dtype=scores.dtype)).astype(np.int64)


class SingleLabelObjective(Objective):
    """Softmax cross-entropy, the training loss optionally weighted per class
    (training.class_weights) and smoothed (training.label_smoothing); evaluation scores the plain
    loss, so runs with and without them compare on it."""

    task = NAME
    # A label the loss skips: the rows of a batch that are no examples get it.
    IGNORE = -100

    def __init__(
        self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0, decision_threshold: float | None = None
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
        import torch
        import torch.nn.functional as F

        if real is not None:
            labels = torch.where(real, labels, self.IGNORE)
        return F.cross_entropy(
            logits.float(), labels, weight=self.class_weights, reduction="sum", ignore_index=self.IGNORE,
            label_smoothing=self.label_smoothing,
        )

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """T^2 * KL(teacher's softened probabilities || the model's), per example."""
        from ftcli.tasks.tensors import softmax_kl, sum_of_real

        return sum_of_real(softmax_kl(logits, teacher, temperature), real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, reduction="none")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float(), dim=-1)

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predicted class ids."""
        from ftcli.tasks.tensors import on_host

        return decide_single_label(on_host(scores), self.decision_threshold)

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        from ftcli.tasks.tensors import on_host

        if self.decision_threshold is not None:
            return self.decide(self.scores(logits))
        return decide_single_label(on_host(logits.float()))  # the logits' own order, without a softmax's rounding

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """The logits of the windows' mean probabilities."""
        from ftcli.tasks.tensors import mean_by

        return mean_by(self.scores(logits), documents, count).clamp(min=1e-12).log()


class SingleLabel(Task):
    name = NAME
    about = "one class per example"
    problem_type = "single_label_classification"
    default_metrics = ("accuracy", "f1")
    losses = ("cross_entropy",)
    metrics = {
        "accuracy": MetricSpec((NAME,), about="share of examples whose class is right"),
        "f1": MetricSpec((NAME,), about="F1 of class 1 with two classes, else the macro average"),
        "precision": MetricSpec((NAME,), about="precision of class 1 with two classes, else macro"),
        "recall": MetricSpec((NAME,), about="recall of class 1 with two classes, else macro"),
        "matthews": MetricSpec((NAME,), about="Matthews correlation of true and predicted classes"),
        **PROBABILITY_METRICS,
    }
    stratified = True
    threshold_is_second_class = True
    options = (
        Option(lambda config: config.decision_threshold != 0.5,
               "decision_threshold is for task: single_label with two classes, not {task} (multi_label: thresholds)"),
        Option(lambda config: bool(config.training.label_smoothing), "training.label_smoothing is for task: single_label, not {task}"),
    )

    # ---------------------------------------------------------------- labels

    def check_labels(self, rows: list[dict], data: Any, where: str) -> None:
        """One class per row, all names or all whole-number ids."""
        first_of = read.first_of_each_kind(rows, data.label_field)
        read.refuse_many(first_of, where, "class")
        if "score" in first_of:
            number, value = first_of["score"]
            raise FtcliError(
                f"{where} row {number}: label {value!r} is a number with a fraction: a score, not a class",
                "to predict a score, set task: regression; classes are names or whole-number ids",
            )
        read.refuse_mixed(first_of, where)

    def check_present(self, rows: list[dict], data: Any, where: str) -> None:
        read.check_present(rows, data.label_columns, where)

    def label_names(self, train: list[dict], data: Any) -> list[str]:
        return read.names_found([read.label_value(row[data.label_field]) for row in train])

    def encode(self, rows: list[dict], data: Any, label_names: list[str], where: str) -> list:
        return [read.label_id(row[data.label_field], label_names, where, number) for number, row in enumerate(rows, start=1)]

    def placeholder_labels(self, rows: list[dict], data: Any, label_names: list[str]) -> list:
        """Class 0 for each row."""
        return [0] * len(rows)

    def check_training_labels(self, labels: list, label_names: list[str]) -> None:
        if len(set(labels)) < 2:
            raise FtcliError(
                f"the training set has only one class ({label_names[labels[0]]})",
                "a classifier needs examples of at least two classes",
            )

    def check_label_names(self, config: Any, label_names: list[str]) -> None:
        """decision_threshold decides between two classes, and with more would be ignored."""
        if config.decision_threshold != 0.5 and len(label_names) > 2:
            shown = ", ".join(label_names[:4]) + (", ..." if len(label_names) > 4 else "")
            raise FtcliError(
                f"decision_threshold={config.decision_threshold} decides between two classes; the data has "
                f"{len(label_names)} ({shown})",
                "drop decision_threshold: with more classes the most probable one is predicted",
            )

    def label_counts(self, labels: np.ndarray, label_names: list[str]) -> tuple[dict[str, int], dict | None]:
        found = Counter(labels.tolist())
        return {name: found.get(index, 0) for index, name in enumerate(label_names)}, None

    def baseline(self, train: np.ndarray, validation: np.ndarray, summary: dict, label_names: list[str]) -> dict[str, Any] | None:
        """Accuracy of always predicting the training set's most common class, on validation."""
        return majority_baseline(summary)

    # ---------------------------------------------------------------- objective and decisions

    def objective(self, config: Any, prepared: Any) -> SingleLabelObjective:
        return SingleLabelObjective(class_weights(config.training.class_weights, prepared), config.training.label_smoothing)

    def saved_objective(self, config: Any, decider: Decider) -> SingleLabelObjective:
        return SingleLabelObjective(decision_threshold=decider.decision_threshold)

    def decider(self, config: Any, saved: np.ndarray | None) -> Decider:
        return Decider(NAME, decision_threshold=None if saved is None else float(saved[0]))

    def scores(self, logits: np.ndarray, decider: Decider) -> np.ndarray:
        return softmax(logits)

    def decide(self, scores: np.ndarray, decider: Decider) -> np.ndarray:
        return decide_single_label(scores, decider.decision_threshold)

    def prediction_fields(self, decider: Any, names: list[str], scores: np.ndarray) -> dict[str, Any]:
        """predicted_label, its probability and every class's."""
        probabilities = {name: round(float(p), 6) for name, p in zip(names, scores)}
        best = int(decider.decide(scores[None, :])[0])
        return {"predicted_label": names[best], "probability": round(float(scores[best]), 6), "probabilities": probabilities}

    def example_record(self, names: list[str], scores: np.ndarray, decision: Any, truth: Any, loss: float, data: Any = None) -> dict[str, Any]:
        """One line of predictions_<split>.jsonl, less the texts."""
        gold, predicted = names[int(truth)], names[int(decision)]
        probabilities = {name: round(float(p), 6) for name, p in zip(names, scores)}
        return {"gold": gold, "prediction": predicted, "probabilities": probabilities, "loss": loss, "correct": gold == predicted}

    def thresholds_of(self, objective: Any, num_labels: int) -> list[float] | None:
        """The decision threshold an objective predicts with, as a list; None: the most probable class."""
        threshold = getattr(objective, "decision_threshold", None)
        return None if threshold is None else [float(threshold)]

    # ---------------------------------------------------------------- thresholds after training

    def tunes(self, config: Any) -> bool:
        return config.decision_threshold == "tuned"

    def fixed_thresholds(self, config: Any, decisions: Any) -> None:
        """A configured decision threshold other than 0.5: the second class's."""
        if isinstance(config.decision_threshold, float) and config.decision_threshold != 0.5:
            decisions.objective = decisions.objective.with_decision_threshold(config.decision_threshold)
            decisions.thresholds = np.array([config.decision_threshold])

    def tune_thresholds(self, config: Any, decisions: Any, scores: np.ndarray, truth: np.ndarray, metric: str) -> None:
        """decision_threshold tuned: the one that maximises the first metric on validation, unless
        that metric reads the probabilities (no threshold changes it)."""
        if config.decision_threshold == "tuned":
            if metric == "loss" or self.metrics[metric].needs_scores:
                return
            score = lambda predicted, labels: self.metric(metric, predicted, labels)  # noqa: E731
            threshold = tune_decision_threshold(scores[:, 1], truth, score)
            decisions.notes = {
                "metric": metric,
                "at_0.5": score((scores[:, 1] >= 0.5).astype(int), truth),
                "at_tuned": score((scores[:, 1] >= threshold).astype(int), truth),
            }
            decisions.thresholds, decisions.how = np.array([threshold]), f"tuned on validation for {metric}"
        elif isinstance(config.decision_threshold, float) and config.decision_threshold != 0.5:
            decisions.thresholds = np.array([config.decision_threshold])
        if decisions.thresholds is not None:
            decisions.objective = decisions.objective.with_decision_threshold(float(decisions.thresholds[0]))

    # ---------------------------------------------------------------- metrics

    def metric(self, name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int = 2, scores: np.ndarray | None = None) -> float:
        """GLUE's definitions: F1, precision and recall of the positive class (1) with two labels,
        their macro averages over the classes beyond two."""
        if self.metrics[name].needs_scores:
            return _from_probabilities(name, scores, references)
        if name == "accuracy":
            return float(np.mean(predictions == references))
        if name in ("f1", "precision", "recall"):
            return sklearn_score(name, references, predictions, "binary" if num_labels == 2 else "macro")
        from sklearn import metrics as skm

        return float(skm.matthews_corrcoef(references, predictions))

    def reliability(self, scores: np.ndarray, references: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list]:
        """The top class's probability against whether it was the true class."""
        correct = (scores.argmax(axis=1) == np.asarray(references).astype(int)).astype(float)
        return reliability_bins(scores.max(axis=1), correct, bins)

    def confusion(self, decisions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray | None:
        """A row per true class, a column per predicted one."""
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        np.add.at(confusion, (references.astype(int).reshape(-1), decisions.astype(int).reshape(-1)), 1)
        return confusion

    # ---------------------------------------------------------------- error analysis

    def error_analysis(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, highest_loss: list[dict]
    ) -> dict[str, Any]:
        """Per class scores, the most confused pairs, the most confident mistakes and the highest-loss examples."""
        confusion = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
        np.add.at(confusion, (labels.astype(int), decisions.astype(int)), 1)
        return {
            "per_class": per_class(label_names, confusion),
            "confused_pairs": confused_pairs(label_names, confusion),
            "confident_mistakes": _mistakes(label_names, scores, decisions, labels),
            "highest_loss": highest_loss,
        }

    def label_issues(self, cleanlab: Any, labels: np.ndarray, scores: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """cleanlab's find_label_issues ranked by self-confidence."""
        from cleanlab.filter import find_label_issues

        given = labels.astype(int)
        ranked = find_label_issues(given, scores, multi_label=False, return_indices_ranked_by="self_confidence")
        quality = scores[np.arange(len(labels)), given]
        return [
            {"index": int(index), "given": names[int(labels[index])], "suggested": names[int(scores[index].argmax())],
             "quality": float(quality[index])}
            for index in ranked
        ]

    def card_description(self, base: str, labels: list[str]) -> str:
        named = ", ".join(f"`{label}`" for label in labels)
        return f"A text classifier fine-tuned from {base} with ftcli ({len(labels)} classes: {named})."


def _from_probabilities(name: str, scores: np.ndarray, references: np.ndarray) -> float:
    """Of one class against the rest (two classes: of class 1), averaged over the classes."""
    if name == "ece":
        return expected_calibration_error(SingleLabel().reliability(np.asarray(scores, dtype=np.float64), references))
    truth = np.eye(scores.shape[1])[references.astype(int)]
    if scores.shape[1] == 2 and name in ("roc_auc", "average_precision", "brier"):
        truth, scores = truth[:, 1:], scores[:, 1:]  # binary: the positive class, as sklearn and GLUE score it
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    if name == "log_loss":
        return float(-np.mean(np.log(clipped[np.arange(len(references)), references.astype(int)])))
    if name == "brier":
        squared = (scores - truth) ** 2
        return float(np.mean(squared.sum(axis=1) if truth.shape[1] > 1 else squared))
    return ranking(name, truth, scores)


def majority_baseline(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Accuracy of always predicting the training set's most common class, on validation."""
    if "train" not in summary or "validation" not in summary:
        return None
    train_counts = summary["train"].label_counts
    majority = max(train_counts, key=train_counts.get)
    validation = summary["validation"]
    return {
        "majority_class": majority,
        "majority_rate": validation.label_counts.get(majority, 0) / max(validation.size, 1),
        "num_labels": len(train_counts),
    }


def class_weights(setting: str | list[float] | None, prepared: Any) -> torch.Tensor | None:
    """The training loss's weight per class (label id order), from training.class_weights."""
    if setting is None:
        return None
    import torch

    from ftcli.tasks.tensors import one_per_label

    names = prepared.label_names
    if setting != "balanced":
        return torch.tensor(one_per_label(setting, names), dtype=torch.float32)
    counts = prepared.summary["train"].label_counts
    missing = [name for name in names if not counts[name]]
    if missing:
        raise FtcliError(
            f"training.class_weights: balanced is undefined: label '{missing[0]}' has no training examples",
            "give training.class_weights as one weight per label",
        )
    total = sum(counts.values())
    return torch.tensor([total / (len(names) * counts[name]) for name in names], dtype=torch.float32)


def tune_decision_threshold(second_class: np.ndarray, labels: np.ndarray, score) -> float:
    """The probability of the second class above which to predict it, maximising `score`
    (predictions, labels -> a number, larger better) over 0.01 .. 0.99; the one nearest 0.5 on ties."""
    candidates = np.round(np.arange(0.01, 1.0, 0.01), 2)
    values = np.array([score((second_class >= candidate).astype(int), labels) for candidate in candidates])
    best = np.flatnonzero(values == values.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


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


def _mistakes(label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    wrong = np.flatnonzero(decisions != labels)
    confidence = scores[wrong, decisions[wrong].astype(int)]
    return [
        {"index": int(index), "true": label_names[int(labels[index])], "predicted": label_names[int(decisions[index])],
         "probability": float(probability)}
        for index, probability in sorted(zip(wrong, confidence), key=lambda pair: -pair[1])[:TOP]
    ]
