"""The objective: the loss a model trains on, and what its outputs mean.

Each task's objective lives in its module (ftcli/tasks/<task>.py: an `Objective`); this is what
every path asks of one. The loop's eager step, its CUDA-graph step, the trainer backend and
evaluation all call it, so a change there changes every path alike. Losses are sums over the
examples of a batch: the callers divide by the examples of an optimizer step, which is how the
loop keeps gradient accumulation and several processes exact. `real` marks the rows that are
examples (the graphed step fills a short last batch with empty slots that add nothing).

    scores(logits)     probabilities (single_label: softmax; multi_label: sigmoid per label) or values
    decide(scores)     class ids, the labels above their thresholds, or the values themselves, by
                       the task's numpy rules (on the host, from tensors or numpy arrays)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ftcli import tasks
from ftcli.config import Config
from ftcli.tasks import Objective

if TYPE_CHECKING:
    from ftcli.data.prepare import Prepared  # only annotations: the module imports datasets and transformers


def build_objective(config: Config, prepared: Prepared) -> Objective:
    """The objective config asks for on this data: a distilled student's trains on the teacher's
    logits too."""
    objective = tasks.get(config.task).objective(config, prepared)
    if config.distill is None:
        return objective
    return Distilled(objective, config.distill.temperature, config.distill.alpha)


class Distilled(Objective):
    """A student's objective (knowledge distillation, Hinton et al. 2015): alpha times the task's
    distillation loss against the teacher's logits plus 1 - alpha times the task loss on the
    labelled rows. Everything else is the task's own objective's, so evaluation, calibration and
    thresholds are the task's."""

    def __init__(self, objective: Objective, temperature: float, alpha: float) -> None:
        self.objective, self.temperature, self.alpha = objective, temperature, alpha

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.objective.task

    @property
    def picks_from_windows(self) -> bool:  # type: ignore[override]
        return self.objective.picks_from_windows

    def to(self, device: torch.device) -> Distilled:
        return Distilled(self.objective.to(device), self.temperature, self.alpha)

    def training_loss_sum(
        self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None, *, teacher: torch.Tensor, labeled: torch.Tensor
    ) -> torch.Tensor:
        """The summed student loss of a batch's real rows. labeled: (rows,) bool, False for an
        unlabeled text, whose placeholder labels the task loss must not read (masked as an empty
        slot is, which no placeholder can turn into a NaN); the distillation loss counts every real row."""
        soft = self.objective.soft_loss_sum(logits, teacher, labels, self.temperature, real)
        labelled = labeled if real is None else real & labeled
        return self.alpha * soft + (1 - self.alpha) * self.objective.training_loss_sum(logits, labels, labelled)

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.objective.soft_loss_sum(logits, teacher, labels, temperature, real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective.loss_sum(logits, labels)

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective.losses(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return self.objective.scores(logits)

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.objective.decide(scores)

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return self.objective.predictions(logits)

    def calibration_pairs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[Objective, torch.Tensor, torch.Tensor]:
        return self.objective.calibration_pairs(logits, labels)

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int, *positions: torch.Tensor | None) -> torch.Tensor:
        return self.objective.aggregate(logits, documents, count, *positions)

    def aggregate_labels(self, labels: torch.Tensor, documents: torch.Tensor, count: int, *positions: torch.Tensor | None) -> torch.Tensor:
        return self.objective.aggregate_labels(labels, documents, count, *positions)


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


def clip_scale(grad_norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies every gradient by (the eager steps
    clip through it): max_grad_norm / (norm + 1e-6), never above 1. The CUDA-graph step applies it
    to its flat gradient buffer in one kernel."""
    return (max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
