"""multi_label: any number of labels per example, each yes or no (a sigmoid per label, binary
cross-entropy); a label is predicted when its probability reaches its threshold, tuned per label
on validation after training."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.errors import FtcliError
import ftcli.tasks.labels as read
from ftcli.tasks.base import TOP, Decider, MetricSpec, Objective, Option, Task
from ftcli.tasks.scoring import CALIBRATION_BINS, PROBABILITY_METRICS, expected_calibration_error, ranking, reliability_bins, sklearn_score

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ftcli")
NAME = "multi_label"


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The probability of each label."""
    return np.exp(-np.logaddexp(0, -logits))  # 1 / (1 + e^-x), without overflowing for large |x|


def decide_multi_label(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """One 0/1 row per example: the labels whose probability reaches their threshold."""
    return (scores >= thresholds).astype(np.int8)


class MultiLabelObjective(Objective):
    """Each label yes or no, by a sigmoid and binary cross-entropy (averaged over the labels of an
    example), positives optionally weighted per label (pos_weight, training.class_weights); a label
    is predicted when its probability reaches its threshold."""

    task = NAME

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
        import torch.nn.functional as F

        from ftcli.tasks.tensors import sum_of_real

        per_example = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), pos_weight=self.pos_weight, reduction="none"
        ).mean(-1)
        return sum_of_real(per_example, real)

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """T^2 * each label's binary KL(teacher's softened probability || the model's), averaged over
        the labels as the task loss is; pos_weight is the labels' and is left out."""
        import torch.nn.functional as F

        from ftcli.tasks.tensors import sum_of_real

        student, teacher = logits.float() / temperature, teacher.float() / temperature
        # In log-sigmoids, finite for any logits: q log(q/p) + (1-q) log((1-q)/(1-p)), 1-q being sigmoid(-t).
        yes, no = F.logsigmoid(teacher) - F.logsigmoid(student), F.logsigmoid(-teacher) - F.logsigmoid(-student)
        chance = teacher.sigmoid()
        return sum_of_real(temperature**2 * (chance * yes + (1 - chance) * no).mean(-1), real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.losses(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float())

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """One 0/1 row per example: the labels whose probability reaches their threshold."""
        from ftcli.tasks.tensors import on_host

        return decide_multi_label(on_host(scores), self.thresholds)

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """A label is in a document when some window has it: the highest of the windows' probabilities."""
        import torch

        scores = self.scores(logits)
        where = documents[:, None].expand(-1, scores.shape[1])
        highest = torch.zeros(count, scores.shape[1]).scatter_reduce_(0, where, scores, "amax", include_self=False)
        return torch.logit(highest.clamp(1e-7, 1 - 1e-7))


class MultiLabel(Task):
    name = NAME
    about = "any number of labels each"
    problem_type = "multi_label_classification"
    default_metrics = ("f1_micro", "f1_macro", "subset_accuracy")
    losses = ("bce",)
    metrics = {
        "f1_micro": MetricSpec((NAME,), about="F1 over every (example, label) decision"),
        "f1_macro": MetricSpec((NAME,), about="mean of the labels' F1"),
        "f1_samples": MetricSpec((NAME,), about="mean of the examples' F1"),
        "precision_micro": MetricSpec((NAME,)),
        "precision_macro": MetricSpec((NAME,)),
        "recall_micro": MetricSpec((NAME,)),
        "recall_macro": MetricSpec((NAME,)),
        "subset_accuracy": MetricSpec((NAME,), about="share of examples whose labels are all right"),
        "hamming_loss": MetricSpec((NAME,), higher_is_better=False, about="share of wrong (example, label) decisions"),
        **PROBABILITY_METRICS,
    }
    pipeline_arguments = ", top_k=None"
    options = (
        Option(lambda config: bool(config.data.label_fields), "data.label_fields (one 0/1 column per label) needs task: multi_label"),
        Option(lambda config: config.thresholds != "tuned",
               "thresholds is for task: multi_label, not {task} (single_label with two classes: decision_threshold)"),
        Option(lambda config: config.data.label_separator != ",",
               "data.label_separator joins several labels in one field: task: multi_label, not {task}"),
    )

    # ---------------------------------------------------------------- labels

    def check_labels(self, rows: list[dict], data: Any, where: str) -> None:
        """0/1 columns (data.label_fields), or label names or ids in one field."""
        if data.label_fields:
            for number, row in enumerate(rows, start=1):
                for column in data.label_fields:
                    if read.label_value(row.get(column)) not in (0, 1, "true", "false"):
                        raise FtcliError(
                            f"{where} row {number}: column '{column}' holds {row.get(column)!r}",
                            "data.label_fields columns hold 0 or 1 (whether the example has that label)",
                        )
            return
        first_of: dict[str, tuple[int, Any]] = {}
        for number, row in enumerate(rows, start=1):
            for item in read.split_labels(row[data.label_field], data.label_separator):
                kind = read.kind(read.label_value(item))
                if kind in ("score", "many"):
                    raise FtcliError(
                        f"{where} row {number}: label {item!r} in {row[data.label_field]!r} is not a label name or id",
                        "to predict a score, set task: regression; labels are names or whole-number ids",
                    )
                first_of.setdefault(kind, (number, item))
        read.refuse_mixed(first_of, where)

    def check_present(self, rows: list[dict], data: Any, where: str) -> None:
        """An example may have no label; each of data.label_fields' columns must be there."""
        if data.label_fields:
            read.check_present(rows, data.label_columns, where)

    def label_names(self, train: list[dict], data: Any) -> list[str]:
        return read.names_found(
            [read.label_value(item) for row in train for item in read.split_labels(row[data.label_field], data.label_separator)]
        )

    def encode(self, rows: list[dict], data: Any, label_names: list[str], where: str) -> list:
        """One 0/1 value per label."""
        encoded = []
        for number, row in enumerate(rows, start=1):
            hot = [0.0] * len(label_names)
            if data.label_fields:
                hot = [1.0 if read.label_value(row[column]) in (1, "true") else 0.0 for column in data.label_fields]
            else:
                for item in read.split_labels(row[data.label_field], data.label_separator):
                    hot[read.label_id(item, label_names, where, number)] = 1.0
            encoded.append(hot)
        return encoded

    def placeholder_labels(self, rows: list[dict], data: Any, label_names: list[str]) -> list:
        """A 0.0 per label for each row, as encode's floats."""
        return [[0.0] * len(label_names) for _ in rows]

    def label_counts(self, labels: np.ndarray, label_names: list[str]) -> tuple[dict[str, int], dict | None]:
        return {name: int(count) for name, count in zip(label_names, labels.sum(axis=0))}, None

    def baseline(self, train: np.ndarray, validation: np.ndarray, summary: dict, label_names: list[str]) -> dict[str, Any] | None:
        """The loss of predicting each label's training rate."""
        priors = np.clip(train.mean(axis=0), 1e-6, 1 - 1e-6)
        bce = -(validation * np.log(priors) + (1 - validation) * np.log(1 - priors)).mean()
        return {"chance_loss": float(bce), "chance": "predicting each label's training rate", "num_labels": len(label_names)}

    # ---------------------------------------------------------------- objective and decisions

    def objective(self, config: Any, prepared: Any) -> MultiLabelObjective:
        fixed = config.thresholds if isinstance(config.thresholds, float) else 0.5
        return MultiLabelObjective(positive_weights(config.training.class_weights, prepared), fixed)

    def saved_objective(self, config: Any, decider: Decider) -> MultiLabelObjective:
        return MultiLabelObjective(thresholds=decider.thresholds)

    def decider(self, config: Any, saved: np.ndarray | None) -> Decider:
        """The thresholds saved beside the model, else the fixed config.thresholds (0.5 for tuned, without a validation split)."""
        fixed = config.thresholds if isinstance(config.thresholds, float) else 0.5
        return Decider(NAME, thresholds=fixed if saved is None else saved)

    def scores(self, logits: np.ndarray, decider: Decider) -> np.ndarray:
        return sigmoid(logits)

    def decide(self, scores: np.ndarray, decider: Decider) -> np.ndarray:
        return decide_multi_label(scores, decider.thresholds)

    def prediction_fields(self, decider: Any, names: list[str], scores: np.ndarray) -> dict[str, Any]:
        """The predicted_labels (those at or above their thresholds) and every label's probability."""
        probabilities = {name: round(float(p), 6) for name, p in zip(names, scores)}
        decided = decider.decide(scores[None, :])[0]
        return {"predicted_labels": [name for name, on in zip(names, decided) if on], "probabilities": probabilities}

    def example_record(self, names: list[str], scores: np.ndarray, decision: Any, truth: Any, loss: float, data: Any = None) -> dict[str, Any]:
        gold = [name for name, on in zip(names, truth) if on]
        predicted = [name for name, on in zip(names, decision) if on]
        probabilities = {name: round(float(p), 6) for name, p in zip(names, scores)}
        return {"gold": gold, "prediction": predicted, "probabilities": probabilities, "loss": loss, "correct": gold == predicted}

    def thresholds_of(self, objective: Any, num_labels: int) -> list[float] | None:
        return np.broadcast_to(np.asarray(objective.thresholds, dtype=float), (num_labels,)).tolist()

    # ---------------------------------------------------------------- thresholds after training

    def tunes(self, config: Any) -> bool:
        return config.thresholds == "tuned"

    def fixed_thresholds(self, config: Any, decisions: Any) -> None:
        decisions.thresholds = np.full(len(decisions.label_names), decisions.objective.thresholds)

    def tune_thresholds(self, config: Any, decisions: Any, scores: np.ndarray, truth: np.ndarray, metric: str) -> None:
        """thresholds tuned: per label, the one that maximises its F1 on validation."""
        if config.thresholds == "tuned":
            decisions.thresholds, decisions.how = tune_thresholds(scores, truth), "tuned on validation"
        else:
            decisions.thresholds = np.full(scores.shape[1], decisions.objective.thresholds)
        decisions.objective = decisions.objective.with_thresholds(decisions.thresholds)

    # ---------------------------------------------------------------- metrics

    def metric(self, name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int = 2, scores: np.ndarray | None = None) -> float:
        if self.metrics[name].needs_scores:
            return self._from_probabilities(name, scores, references)
        predictions, references = predictions.astype(int), references.astype(int)
        if name == "subset_accuracy":
            return float(np.mean(np.all(predictions == references, axis=1)))
        if name == "hamming_loss":
            return float(np.mean(predictions != references))
        kind, _, average = name.partition("_")
        return sklearn_score(kind, references, predictions, average)

    def _from_probabilities(self, name: str, scores: np.ndarray, references: np.ndarray) -> float:
        """Of each label, averaged over the labels."""
        if name == "ece":
            return expected_calibration_error(self.reliability(scores, references))
        truth = references.astype(float)
        clipped = np.clip(scores, 1e-7, 1 - 1e-7)
        if name == "log_loss":
            return float(-np.mean(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)))
        if name == "brier":
            return float(np.mean((scores - truth) ** 2))
        return ranking(name, truth, scores)

    def reliability(self, scores: np.ndarray, references: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list]:
        """Every label's probability against its outcome."""
        scores = np.asarray(scores, dtype=np.float64)
        return reliability_bins(scores.reshape(-1), np.asarray(references, dtype=np.float64).reshape(-1), bins)

    def per_label(self, decisions: np.ndarray, references: np.ndarray) -> dict[str, list[float]] | None:
        """Precision, recall, F1 and support (positives) of each label, in label order."""
        if not len(references):
            return {}
        from sklearn.metrics import precision_recall_fscore_support

        precision, recall, f1, support = precision_recall_fscore_support(references, decisions, average=None, zero_division=0.0)
        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(), "support": support.tolist()}

    # ---------------------------------------------------------------- error analysis

    def error_analysis(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, highest_loss: list[dict]
    ) -> dict[str, Any]:
        """Wrong (example, label) decisions, the surest first: false positives by their probability,
        missed labels by one minus theirs; and the highest-loss examples."""
        rows, columns = np.nonzero(decisions != labels)
        sureness = np.where(decisions[rows, columns] == 1, scores[rows, columns], 1 - scores[rows, columns])
        order = np.argsort(-sureness, kind="stable")[:TOP]
        mistakes = [
            {"index": int(rows[at]), "label": label_names[columns[at]], "kind": "false positive" if decisions[rows[at], columns[at]] else "missed",
             "probability": float(scores[rows[at], columns[at]])}
            for at in order
        ]
        return {"confident_mistakes": mistakes, "highest_loss": highest_loss}

    def label_issues(self, cleanlab: Any, labels: np.ndarray, scores: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """cleanlab's find_label_issues ranked by self-confidence, with its label quality score."""
        from cleanlab.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores

        given = [list(np.flatnonzero(row)) for row in labels]
        ranked = find_label_issues(given, scores, multi_label=True, return_indices_ranked_by="self_confidence")
        quality = get_label_quality_scores(given, scores)
        return [
            {"index": int(index), "given": ",".join(name for name, on in zip(names, labels[index]) if on),
             "suggested": ",".join(name for name, p in zip(names, scores[index]) if p >= 0.5), "quality": float(quality[index])}
            for index in ranked
        ]

    def card_description(self, base: str, labels: list[str]) -> str:
        named = ", ".join(f"`{label}`" for label in labels)
        return (
            f"A multi-label classifier fine-tuned from {base} with ftcli: each of {len(labels)} labels ({named}) is "
            "predicted on its own; thresholds.json holds the probability above which each label is predicted."
        )


def positive_weights(setting: str | list[float] | None, prepared: Any) -> torch.Tensor | None:
    """pos_weight per label: balanced is negatives / positives in training; a label without a
    positive training example (a shortened training set) keeps weight 1."""
    if setting is None:
        return None
    import torch

    from ftcli.tasks.tensors import one_per_label

    names = prepared.label_names
    if setting != "balanced":
        return torch.tensor(one_per_label(setting, names), dtype=torch.float32)
    positives, examples = prepared.summary["train"].label_counts, prepared.summary["train"].size
    missing = [name for name in names if not positives[name]]
    if missing:
        log.warning("class_weights balanced: %s without a positive training example keep weight 1", ", ".join(missing))
    return torch.tensor(
        [(examples - positives[name]) / positives[name] if positives[name] else 1.0 for name in names], dtype=torch.float32
    )


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
