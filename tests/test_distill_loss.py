"""The distillation loss: each task's soft loss against a teacher's logits (zero on agreement, the
hand formula, its gradient, real rows only, float32 for low-precision logits), and `Distilled`,
which mixes it with the task loss on the labelled rows and is the task's own objective otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ftcli.config import Config
from ftcli.objective import Distilled, build_objective
from ftcli.tasks.multi_label import MultiLabelObjective
from ftcli.tasks.regression import RegressionObjective
from ftcli.tasks.single_label import SingleLabelObjective
from ftcli.tasks.token_classification import IGNORE, TokenObjective

T = 2.0
PIECES = 2.5  # token_classification's pieces per sentence


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def batch(task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, teacher, labels) of four rows."""
    if task == "token_classification":
        labels = torch.tensor([[IGNORE, 1, IGNORE, 0, IGNORE], [IGNORE, 2, 2, 0, 1], [IGNORE, 0, IGNORE, IGNORE, IGNORE], [IGNORE, 1, 2, IGNORE, IGNORE]])
        return random(4, 5, 3), random(4, 5, 3, seed=1), labels
    if task == "regression":
        return random(4, 1), random(4, 1, seed=1), random(4, seed=2)
    if task == "multi_label":
        return random(4, 3), random(4, 3, seed=1), torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    return random(4, 3), random(4, 3, seed=1), torch.tensor([0, 2, 1, 1])


def objective_of(task: str, weighted: bool = False):
    weights = torch.tensor([2.0, 0.5, 3.0]) if weighted else None
    return {
        "single_label": lambda: SingleLabelObjective(weights, 0.1 if weighted else 0.0),
        "multi_label": lambda: MultiLabelObjective(weights),
        "regression": lambda: RegressionObjective(),
        "token_classification": lambda: TokenObjective(weights, 0.1 if weighted else 0.0, PIECES),
    }[task]()


def by_hand(task: str, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's distillation loss, written out."""
    if task == "regression":
        return (logits.squeeze(-1) - teacher.squeeze(-1)) ** 2
    if task == "multi_label":
        p, q = torch.sigmoid(logits / T), torch.sigmoid(teacher / T)
        return T**2 * (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean(-1)
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(teacher / T, -1), reduction="none").sum(-1) * T**2
    if task == "token_classification":
        return (kl * (labels != IGNORE)).sum(-1) / PIECES
    return kl


TASKS = ["single_label", "multi_label", "regression", "token_classification"]


@pytest.mark.parametrize("task", TASKS)
def test_the_soft_loss_is_zero_on_agreement_and_the_hand_formula_otherwise(task):
    logits, teacher, labels = batch(task)
    objective = objective_of(task, weighted=True)  # weights and smoothing are the task loss's, not the soft loss's
    assert objective.soft_loss_sum(logits, logits.clone(), labels, T).item() == 0.0
    soft = objective.soft_loss_sum(logits, teacher, labels, T)
    assert soft.item() > 0
    assert torch.allclose(soft, by_hand(task, logits, teacher, labels).sum(), rtol=1e-5)


def test_regression_reads_the_teacher_as_rows_or_a_column_and_has_no_temperature():
    logits, teacher, labels = batch("regression")
    objective = RegressionObjective()
    column = objective.soft_loss_sum(logits, teacher, labels, T)
    assert torch.equal(objective.soft_loss_sum(logits, teacher.squeeze(-1), labels, T), column)
    assert torch.equal(objective.soft_loss_sum(logits, teacher, labels, 7.0), column)


@pytest.mark.parametrize("task", ["single_label", "token_classification"])
def test_the_softmax_soft_losss_gradient_is_t_times_the_probabilities_difference(task):
    logits, teacher, labels = batch(task)
    logits.requires_grad_()
    objective_of(task).soft_loss_sum(logits, teacher, labels, T).backward()
    expected = T * (torch.softmax(logits.detach() / T, -1) - torch.softmax(teacher / T, -1))
    if task == "token_classification":
        expected = expected * (labels != IGNORE)[..., None] / PIECES  # only counted pieces pull
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_the_multi_label_soft_loss_is_finite_for_saturated_logits():
    # sigmoid(+-200) is 1 or 0 in float32: log(sigmoid()) would make an inf here.
    logits, teacher = torch.tensor([[400.0, -400.0, 0.0]]), torch.tensor([[-400.0, 400.0, 30.0]])
    logits.requires_grad_()
    soft = MultiLabelObjective().soft_loss_sum(logits, teacher, torch.zeros(1, 3), T)
    soft.backward()
    assert torch.isfinite(soft) and soft.item() > 0 and torch.isfinite(logits.grad).all()
    # Its gradient is T * (sigmoid(s / T) - sigmoid(t / T)), over the labels.
    assert torch.allclose(logits.grad, T * (torch.sigmoid(logits.detach() / T) - torch.sigmoid(teacher / T)) / 3, atol=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_rows_that_are_not_real_add_no_loss_and_no_gradient(task):
    logits, teacher, labels = batch(task)
    logits.requires_grad_()
    real = torch.tensor([True, False, True, False])
    soft = objective_of(task).soft_loss_sum(logits, teacher, labels, T, real)
    assert torch.allclose(soft, by_hand(task, logits.detach(), teacher, labels)[real].sum(), rtol=1e-5)
    soft.backward()
    assert torch.count_nonzero(logits.grad[~real]) == 0 and torch.count_nonzero(logits.grad[real]) > 0


@pytest.mark.parametrize("task", TASKS)
def test_low_precision_logits_give_the_loss_of_their_float32_copy(task):
    logits, teacher, labels = batch(task)
    low = logits.to(torch.bfloat16)
    soft = objective_of(task).soft_loss_sum(low, teacher, labels, T)
    assert soft.dtype == torch.float32
    assert torch.equal(soft, objective_of(task).soft_loss_sum(low.float(), teacher, labels, T))


def test_token_classification_counts_only_the_labelled_pieces():
    logits, teacher, labels = batch("token_classification")
    objective = objective_of("token_classification")
    uncounted = labels == IGNORE
    moved = torch.where(uncounted[..., None], teacher + 5 * random(4, 5, 3, seed=3), teacher)
    assert torch.equal(objective.soft_loss_sum(logits, moved, labels, T), objective.soft_loss_sum(logits, teacher, labels, T))
    a_tag = labels.clone()
    a_tag[0, 1] = 2  # another tag on a counted piece: labels are structure, not targets
    assert torch.equal(objective.soft_loss_sum(logits, teacher, a_tag, T), objective.soft_loss_sum(logits, teacher, labels, T))


# ---------------------------------------------------------------- Distilled


def distilled(task: str, alpha: float, weighted: bool = True) -> Distilled:
    return Distilled(objective_of(task, weighted), T, alpha)


def placeholders(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Other labels of the same structure: what an unlabeled text might carry."""
    if task == "token_classification":
        return torch.where(labels == IGNORE, IGNORE, 2)
    if task == "single_label":
        return torch.full_like(labels, 2)
    return torch.zeros_like(labels) + (1 if task == "multi_label" else 1e6)


@pytest.mark.parametrize("task", TASKS)
def test_alpha_weighs_the_soft_loss_against_the_task_loss(task):
    logits, teacher, labels = batch(task)
    labeled = torch.ones(4, dtype=torch.bool)
    task_loss = objective_of(task, weighted=True).training_loss_sum(logits, labels)
    soft = objective_of(task).soft_loss_sum(logits, teacher, labels, T)
    assert torch.equal(distilled(task, 0.0).training_loss_sum(logits, labels, teacher=teacher, labeled=labeled), task_loss)
    only_soft = distilled(task, 1.0).training_loss_sum
    assert torch.equal(only_soft(logits, labels, teacher=teacher, labeled=labeled), soft)
    assert torch.equal(only_soft(logits, placeholders(task, labels), teacher=teacher, labeled=labeled), soft)  # labels unread
    mixed = distilled(task, 0.3).training_loss_sum(logits, labels, teacher=teacher, labeled=labeled)
    assert torch.allclose(mixed, 0.3 * soft + 0.7 * task_loss)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("weighted", [False, True])
def test_unlabeled_rows_add_only_their_soft_loss_whatever_their_placeholder(task, weighted):
    logits, teacher, labels = batch(task)
    logits.requires_grad_()
    real, labeled = torch.tensor([True, True, True, False]), torch.tensor([True, False, True, True])
    counted = real & labeled
    objective = distilled(task, 0.4, weighted)
    loss = objective.training_loss_sum(logits, labels, real, teacher=teacher, labeled=labeled)
    soft = objective.soft_loss_sum(logits, teacher, labels, T, real)
    task_loss = objective.objective.training_loss_sum(logits, labels, counted)
    assert torch.allclose(loss, 0.4 * soft + 0.6 * task_loss)
    unlabeled = torch.where(labeled.reshape(-1, *[1] * (labels.dim() - 1)), labels, placeholders(task, labels))
    again = objective.training_loss_sum(logits, unlabeled, real, teacher=teacher, labeled=labeled)
    assert torch.equal(again, loss) and torch.isfinite(again)
    # The unlabeled row moves toward the teacher only: its gradient is the soft loss's.
    (grad,) = torch.autograd.grad(again, logits)
    (soft_grad,) = torch.autograd.grad(0.4 * soft, logits)
    assert torch.allclose(grad[1], soft_grad[1], atol=1e-7) and torch.count_nonzero(grad[3]) == 0
    every_row = objective.training_loss_sum(logits, unlabeled, teacher=teacher, labeled=labeled)  # no empty slots
    every_soft = objective.soft_loss_sum(logits, teacher, labels, T)
    assert torch.allclose(every_row, 0.4 * every_soft + 0.6 * objective.objective.training_loss_sum(logits, labels, labeled))


def test_distilled_is_the_task_objective_beyond_training():
    logits, teacher, labels = batch("single_label")
    inner = SingleLabelObjective(torch.tensor([2.0, 1.0, 1.0]), decision_threshold=None)
    objective = Distilled(inner, T, 0.5)
    assert objective.task == "single_label" and not objective.picks_from_windows
    assert torch.equal(objective.scores(logits), inner.scores(logits))
    assert np.array_equal(objective.predictions(logits), inner.predictions(logits))
    assert np.array_equal(objective.decide(objective.scores(logits)), inner.decide(inner.scores(logits)))
    assert torch.equal(objective.loss_sum(logits, labels), inner.loss_sum(logits, labels))  # evaluation: unweighted, no teacher
    assert torch.equal(objective.losses(logits, labels), inner.losses(logits, labels))
    assert objective.calibration_pairs(logits, labels)[0] is inner
    documents = torch.tensor([0, 0, 1, 1])
    assert torch.equal(objective.aggregate(logits, documents, 2), inner.aggregate(logits, documents, 2))
    assert torch.equal(objective.aggregate_labels(labels, documents, 2), inner.aggregate_labels(labels, documents, 2))
    moved = objective.to(torch.device("cpu"))
    assert isinstance(moved, Distilled) and (moved.temperature, moved.alpha) == (T, 0.5)
    assert torch.equal(moved.objective.class_weights, inner.class_weights)


def test_distilled_passes_token_positions_on():
    logits, _, labels = batch("token_classification")
    inner = objective_of("token_classification")
    objective = Distilled(inner, T, 0.5)
    assert objective.task == "token_classification" and objective.picks_from_windows
    documents, positions = torch.tensor([0, 0, 1, 1]), torch.tensor([[0, 1, 2, -1, -1], [-1, -1, 3, 4, 5]] * 2)
    assert torch.equal(objective.aggregate(logits, documents, 2, positions), inner.aggregate(logits, documents, 2, positions))
    assert torch.equal(
        objective.aggregate_labels(labels, documents, 2, positions), inner.aggregate_labels(labels, documents, 2, positions)
    )
    kept = objective.calibration_pairs(logits, labels)
    assert torch.equal(kept[2], labels[labels != IGNORE])


@pytest.mark.parametrize("task", TASKS)
def test_build_objective_wraps_the_task_objective_when_distilling(task):
    raw = {"name": "student", "model": "tiny", "task": task, "data": {"train": "train.jsonl"}}
    prepared = SimpleNamespace(splits={"train": {"labels": [[IGNORE, 0, 1], [IGNORE, 1, IGNORE]]}})
    plain = build_objective(Config.model_validate(raw), prepared)
    assert not isinstance(plain, Distilled) and plain.task == task
    student = build_objective(Config.model_validate(raw | {"distill": {"teacher": "runs/teacher", "temperature": 3.0, "alpha": 0.25}}), prepared)
    assert isinstance(student, Distilled) and type(student.objective) is type(plain)
    assert (student.temperature, student.alpha, student.task) == (3.0, 0.25, task)
    if task == "token_classification":
        assert student.objective.pieces_per_sentence == 1.5
