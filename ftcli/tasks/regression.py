"""regression: one number per example (the model's raw output), trained on the mean squared error
or the Huber loss; data.clip_predictions keeps predictions in data.label_range."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.errors import FtcliError
import ftcli.tasks.labels as read
from ftcli.tasks.base import Decider, MetricSpec, Objective, Option, Task

if TYPE_CHECKING:
    import torch

NAME = "regression"
OUTLIER_SIGMAS = 3.0  # a training example whose out-of-fold residual is this far out is a label issue


def regression_values(logits: np.ndarray, clip: tuple[float, float] | None = None) -> np.ndarray:
    """The predictions: the one output, within `clip` when given."""
    values = logits.squeeze(-1)
    return np.clip(values, *clip) if clip else values


class RegressionObjective(Objective):
    """The model's one output is the prediction, trained on the mean squared error (or the Huber
    loss) to the target; data.clip_predictions keeps predictions in data.label_range."""

    task = NAME

    def __init__(self, loss: str = "mse", clip: tuple[float, float] | None = None) -> None:
        self.loss, self.clip = loss, clip

    def to(self, device: torch.device) -> RegressionObjective:
        return self

    def _per_example(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        predicted = logits.float().squeeze(-1)
        if self.loss == "huber":
            return F.huber_loss(predicted, labels.float(), reduction="none")
        return (predicted - labels.float()) ** 2

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        from ftcli.tasks.tensors import sum_of_real

        return sum_of_real(self._per_example(logits, labels), real)

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The squared error to the teacher's value, per example. No temperature: it softens a
        distribution, and a value has none to soften; nor T^2, which only undoes the 1/T^2 that
        dividing both logits by T puts on a softmax loss's gradient."""
        from ftcli.tasks.tensors import sum_of_real

        predicted = logits.float().squeeze(-1)
        return sum_of_real((predicted - teacher.float().reshape(predicted.shape)) ** 2, real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._per_example(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._per_example(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        values = logits.float().squeeze(-1)
        return values.clamp(*self.clip) if self.clip else values

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        from ftcli.tasks.tensors import on_host

        return on_host(scores)

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        """The windows' mean value."""
        from ftcli.tasks.tensors import mean_by

        return mean_by(logits.float(), documents, count)


class Regression(Task):
    name = NAME
    about = "a number"
    problem_type = "regression"
    default_metrics = ("pearson", "spearman", "mse")
    losses = ("mse", "huber")
    metrics = {
        "pearson": MetricSpec((NAME,), about="Pearson correlation of predicted and true values"),
        "spearman": MetricSpec((NAME,), about="Spearman (rank) correlation of predicted and true values"),
        "mse": MetricSpec((NAME,), higher_is_better=False, about="mean squared error"),
        "rmse": MetricSpec((NAME,), higher_is_better=False, about="root mean squared error"),
        "mae": MetricSpec((NAME,), higher_is_better=False, about="mean absolute error"),
        "r2": MetricSpec((NAME,), about="coefficient of determination"),
    }
    has_classes = False
    calibrates = False
    options = (Option(lambda config: config.data.label_range is not None, "data.label_range is for task: regression, not {task}"),)

    def own_problems(self, config: Any) -> list[str]:
        problems = []
        if config.data.label_names:
            problems.append("data.label_names names classes; a regression run predicts one number: drop it")
        if config.training.class_weights is not None:
            problems.append("training.class_weights weighs classes; a regression run has none: drop it")
        return problems

    # ---------------------------------------------------------------- labels

    def check_labels(self, rows: list[dict], data: Any, where: str) -> None:
        """One number per row, within data.label_range when set."""
        first_of = read.first_of_each_kind(rows, data.label_field)
        read.refuse_many(first_of, where, "number")
        if "name" in first_of:
            number, value = first_of["name"]
            raise FtcliError(
                f"{where} row {number}: label {value!r} is not a number, and task regression predicts one",
                "give every row a number, or set task: single_label to predict classes",
            )
        if data.label_range is None:
            return
        low, high = data.label_range
        for number, row in enumerate(rows, start=1):
            value = float(read.label_value(row[data.label_field]))
            if not low <= value <= high:
                raise FtcliError(
                    f"{where} row {number}: label {value:g} is outside data.label_range [{low:g}, {high:g}]",
                    "fix the label, or widen data.label_range",
                )

    def check_present(self, rows: list[dict], data: Any, where: str) -> None:
        read.check_present(rows, data.label_columns, where)

    def resolve_label_names(self, train: list[dict], data: Any, hub_names: list[str] | None) -> list[str]:
        """The one output's name."""
        return [data.label_field]

    def encode(self, rows: list[dict], data: Any, label_names: list[str], where: str) -> list:
        return [float(read.label_value(row[data.label_field])) for row in rows]

    def placeholder_labels(self, rows: list[dict], data: Any, label_names: list[str]) -> list:
        """0.0 for each row."""
        return [0.0] * len(rows)

    def label_counts(self, labels: np.ndarray, label_names: list[str]) -> tuple[dict[str, int], dict | None]:
        stats = {"mean": float(labels.mean()), "std": float(labels.std()), "min": float(labels.min()), "max": float(labels.max())}
        return {}, stats

    def baseline(self, train: np.ndarray, validation: np.ndarray, summary: dict, label_names: list[str]) -> dict[str, Any] | None:
        """The mean squared error of always predicting the training mean."""
        mean = float(np.mean(train))
        mse = float(np.mean((validation - mean) ** 2))
        return {"chance_loss": mse, "chance": f"always predicting the training mean {mean:.3g}"}

    # ---------------------------------------------------------------- objective and decisions

    def objective(self, config: Any, prepared: Any) -> RegressionObjective:
        return RegressionObjective(config.loss, self.decider(config, None).clip)

    def saved_objective(self, config: Any, decider: Decider) -> RegressionObjective:
        return RegressionObjective(config.loss, decider.clip)

    def decider(self, config: Any, saved: np.ndarray | None) -> Decider:
        return Decider(NAME, clip=tuple(config.data.label_range) if config.data.clip_predictions else None)

    def scores(self, logits: np.ndarray, decider: Decider) -> np.ndarray:
        return regression_values(logits, decider.clip)

    def decide(self, scores: np.ndarray, decider: Decider) -> np.ndarray:
        return scores

    def prediction_fields(self, decider: Any, names: list[str], scores: np.ndarray) -> dict[str, Any]:
        return {"prediction": round(float(scores), 6)}

    def example_record(self, names: list[str], scores: np.ndarray, decision: Any, truth: Any, loss: float, data: Any = None) -> dict[str, Any]:
        return {"gold": float(truth), "prediction": float(decision), "error": float(decision - truth), "loss": loss}

    def thresholds_of(self, objective: Any, num_labels: int) -> list[float] | None:
        return None

    # ---------------------------------------------------------------- metrics

    def metric(self, name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int = 2, scores: np.ndarray | None = None) -> float:
        predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
        references = np.asarray(references, dtype=np.float64).reshape(-1)
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
        return float(stats.spearmanr(predictions, references)[0])

    # ---------------------------------------------------------------- error analysis

    def error_analysis(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, highest_loss: list[dict]
    ) -> dict[str, Any]:
        """The residuals by target range, and the highest-loss examples."""
        return {"residuals": residuals_by_range(decisions, labels), "highest_loss": highest_loss}

    def label_issues(self, cleanlab: Any, labels: np.ndarray, scores: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """The examples whose out-of-fold residual is an outlier, ranked by cleanlab's label quality score."""
        from cleanlab.regression.rank import get_label_quality_scores

        predictions = scores.reshape(-1)
        quality = get_label_quality_scores(labels, predictions)
        residuals = predictions - labels
        outliers = np.abs(residuals - residuals.mean()) > OUTLIER_SIGMAS * residuals.std()
        ranked = [int(index) for index in np.argsort(quality, kind="stable") if outliers[index]]
        return [
            {"index": index, "given": float(labels[index]), "suggested": float(predictions[index]), "quality": float(quality[index])}
            for index in ranked
        ]

    def card_description(self, base: str, labels: list[str]) -> str:
        return f"A regression model fine-tuned from {base} with ftcli: it predicts `{labels[0]}`, one number per text."


def residuals_by_range(predictions: np.ndarray, targets: np.ndarray, bins: int = 5) -> list[dict[str, Any]]:
    """In equal-width ranges of the true value, how many examples, the mean residual
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
