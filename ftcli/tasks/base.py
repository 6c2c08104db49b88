"""What every task provides, and the pieces several tasks share.

A task (ftcli/tasks/<name>.py) is one `Task`: its declarative facts (name, problem_type, default
metrics, losses, the metrics that fit it), how its labels are checked, named, encoded and
summarised, its torch objective (built lazily: importing a task imports no torch), its numpy
decisions (a `Decider`, for the ONNX path too) and prediction fields, its metrics, what calibration
and thresholds mean for it, and its error analysis. The rest of ftcli asks the task
(`ftcli.tasks.get(name)`) and never names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np


if TYPE_CHECKING:
    import torch

# Every task by name, in the order the config reference lists them: filled by ftcli/tasks/__init__.py.
REGISTRY: dict[str, Task] = {}
TOP = 20  # examples in each list of an error analysis; the terminal shows the first few


@dataclass(frozen=True)
class MetricSpec:
    tasks: tuple[str, ...]
    higher_is_better: bool = True
    needs_scores: bool = False  # computed from probabilities, not from decisions
    about: str = ""  # what it measures, for the config reference and the errors


@dataclass(frozen=True)
class Option:
    """A config option only one task reads: set under another task, it would be ignored."""

    is_set: Callable[[Any], bool]  # config -> whether the option is set
    problem: str  # what to say, {task} being the run's task


@dataclass(frozen=True)
class Decider:
    """A task's scores and decisions on numpy arrays: what its torch objective computes, for a
    model that runs without torch (an ONNX export)."""

    task: str
    decision_threshold: float | None = None  # single_label: the second class's; None: the most probable class
    thresholds: np.ndarray | float = 0.5  # multi_label: each label's
    clip: tuple[float, float] | None = None  # regression: data.label_range with data.clip_predictions

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return REGISTRY[self.task].scores(logits, self)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return REGISTRY[self.task].decide(scores, self)


class Objective:
    """What every task's objective does (the torch side of a task); ftcli's code calls these and
    nothing task-specific. Losses are sums over the examples of a batch."""

    task: str
    # Windows put together by taking each output whole from one window (a tagger's tokens), not by
    # averaging: the merged logits are then plain rows, which a temperature scales without flipping.
    picks_from_windows = False

    def to(self, device: torch.device) -> Objective:
        """The same objective with its tensors on `device` (moved once, not at every step)."""
        raise NotImplementedError

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """The summed training loss of a batch's real rows (all rows when `real` is None)."""
        raise NotImplementedError

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The summed distillation loss of a batch's real rows (all rows when `real` is None): how
        far the logits are from the teacher's (`teacher`, logits of the same shape), each logit
        divided by `temperature` where the task's outputs are probabilities. `labels` gives the
        structure only (token_classification: the pieces that count), never a target: an unlabeled
        text's are placeholders. Never weighted nor smoothed: the teacher's outputs are the target."""
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed evaluation loss of a batch: never weighted."""
        raise NotImplementedError

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's evaluation loss (error analysis ranks examples by it)."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities, or predicted values."""
        raise NotImplementedError

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """The predictions, on the host."""
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return self.decide(self.scores(logits))

    def calibration_pairs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[Objective, torch.Tensor, torch.Tensor]:
        """What a temperature is fitted on and calibration is measured on: (the objective that
        scores them, their logits, their labels); the examples themselves, unless a task's examples
        hold many predictions (token_classification: each labelled piece is one)."""
        return self, logits, labels

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """One row of logits per document from its windows' (long_text: window), so that every
        other method scores documents as it scores examples. token_classification's also takes
        each window token's place in its sentence (prepare's doc_positions: ftcli.inference passes
        them after `count` where a split has them)."""
        raise NotImplementedError

    def aggregate_labels(self, labels: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """Each document's label, from its windows' (which all carry it)."""
        import torch

        first = torch.full((count,), len(documents), dtype=torch.long).scatter_reduce_(
            0, documents, torch.arange(len(documents)), "amin"
        )
        return labels[first]


class Task:
    """A kind of task. Subclasses set the facts and override what differs; the defaults here are
    those of a task with classes."""

    name: str
    about: str  # one line for the config reference
    problem_type: str  # transformers' name for the task (config.json problem_type), which pipeline() reads
    default_metrics: tuple[str, ...]  # when the config names none; the first picks the best model
    losses: tuple[str, ...]  # training.loss's choices, the default first
    metrics: dict[str, MetricSpec]  # the built-in metrics that fit, in the config reference's order
    has_classes = True  # its outputs are named classes or labels (regression: one number)
    calibrates = True  # calibration: temperature scales its probabilities
    class_noun = "class"  # what a row of its per-class table (error_analysis's per_class) is, as evaluate and the report name it
    stratified = False  # cross-validation folds keep its classes' proportions
    options: tuple[Option, ...] = ()  # the options only this task reads
    model_head = "sequence_classification"  # the transformers head it trains (modeling.HEADS)
    token_level = False  # a label per token (token_classification), not per example
    data_defaults: dict[str, Any] = {}  # data options it sets when the config leaves them out (a value, or a function of the data options given)
    not_yet: tuple[str, ...] = ()  # the commands (export, audit, serve) that have no path for it yet

    def own_problems(self, config: Any) -> list[str]:
        """Options this task refuses that no other task owns (regression: class names, weights)."""
        return []

    def problems(self, config: Any, others: list[Task]) -> list[str]:
        """The options of other tasks set under this one, then those this task refuses."""
        owned = [
            option.problem.format(task=self.name) for other in others for option in other.options
            if option.is_set(config) and option not in self.options  # an option two tasks read is this one's too
        ]
        return list(dict.fromkeys(owned)) + self.own_problems(config)

    # ---------------------------------------------------------------- labels (each task overrides the rest)

    def resolve_label_names(self, train: list[dict], data: Any, hub_names: list[str] | None) -> list[str]:
        """data.label_fields, data.label_names, else the Hub's ClassLabel names, else the training labels'."""
        if data.label_fields:
            return list(data.label_fields)
        if data.label_names:
            return list(data.label_names)
        if hub_names:
            return list(hub_names)
        return self.label_names(train, data)

    def check_training_labels(self, labels: list, label_names: list[str]) -> None:
        """What the encoded training labels must hold (single_label: two classes at least)."""

    def placeholder_labels(self, rows: list[dict], data: Any, label_names: list[str]) -> list:
        """Labels for texts that have none (data.unlabeled: a distilled student learns from its
        teacher's outputs on them): as `encode` gives each row, of the same shape and type, so
        that the rows are aligned, batched and moved as labelled ones; never a target."""
        raise NotImplementedError

    def check_label_names(self, config: Any, label_names: list[str]) -> None:
        """Options that need a given number of classes, checked as soon as the data names its
        classes (before tokenizing)."""

    # ---------------------------------------------------------------- thresholds after training

    pipeline_task = "text-classification"  # transformers' pipeline() task and the Hub's pipeline_tag, in the model card
    pipeline_arguments = ""  # what transformers' pipeline() needs beyond the model, in the model card
    threshold_is_second_class = False  # its one threshold is the second class's probability

    def tunes(self, config: Any) -> bool:
        """Whether a threshold is tuned on validation after training."""
        return False

    def fixed_thresholds(self, config: Any, decisions: Any) -> None:
        """No validation to tune on: the configured thresholds, set on `decisions` (finalize.Decisions)."""

    def tune_thresholds(self, config: Any, decisions: Any, scores: np.ndarray, truth: np.ndarray, metric: str) -> None:
        """The thresholds picked on validation's scores, set on `decisions`."""

    # ---------------------------------------------------------------- what evaluate shows

    def confusion(self, decisions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray | None:
        """single_label's confusion matrix; None for a task without one."""
        return None

    def per_label(self, decisions: np.ndarray, references: np.ndarray) -> dict[str, list[float]] | None:
        """multi_label's scores per label; None for a task without them."""
        return None

    def score_findings(self, scores: Mapping[str, Any], config: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What the kept model's validation scores say beyond the learning curves, each finding as
        {"summary", "evidence", "remedies"} (the report's diagnosis lists them). scores: its
        validation metrics, with eval_validation.json's "errors" when it was evaluated; config: the
        run's config as a mapping. None for most tasks: their curves say it."""
        return []

    def row_predictions(self, decider: Any, names: list[str], scores: np.ndarray, tokenized: Any, rows: list[dict], data: Any) -> list[dict[str, Any]]:
        """Each row's prediction fields (`ftcli predict`), from its scores; token_classification
        also reads the tokenized rows (each sub-token's word) and the texts."""
        return [self.prediction_fields(decider, names, row_scores) for row_scores in scores]

    def per_example(self, values: Any, tokenized: Any) -> np.ndarray:
        """Each example's labels or scores as `ftcli audit` reads them, from a split's (its rows
        tokenized: `tokenized`): the array as it is; token_classification: each word's."""
        return np.asarray(values)

    def issue_record(self, issue: dict[str, Any], row: dict, text_fields: list[str]) -> dict[str, Any]:
        """A label issue (label_issues) with its example's texts, as label_issues.csv lists it."""
        return issue | {field: row[field] for field in text_fields}

    def analyse(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, losses: np.ndarray,
        rows: list[dict] | None = None, tokenized: Any = None, data: Any = None,
    ) -> dict[str, Any]:
        """Where the model goes wrong: the task's own tables (error_analysis) and the highest-loss
        examples. rows, tokenized, data: the split's rows, its tokenized examples and the data
        settings, for a task that names its errors with the words (token_classification)."""
        highest_loss = [
            {"index": int(index), "loss": float(losses[index])} for index in np.argsort(-losses, kind="stable")[:TOP]
        ]
        return self.error_analysis(label_names, scores, decisions, labels, highest_loss)
