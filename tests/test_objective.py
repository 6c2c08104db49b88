"""The objective: golden values of the loss, the evaluation loss that ignores class weights, the
empty slots a graphed step fills, what logits mean, and the clipping factor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ftcli.objective import clip_scale
from ftcli.tasks import Decider, get
from ftcli.tasks.multi_label import MultiLabelObjective
from ftcli.tasks.regression import RegressionObjective
from ftcli.tasks.single_label import SingleLabelObjective

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
LABELS = torch.tensor([0, 1, 0])


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(logits.tolist(), labels.tolist())]


def test_training_loss_is_the_summed_cross_entropy():
    expected = sum(cross_entropy_by_hand(LOGITS, LABELS))
    assert SingleLabelObjective().training_loss_sum(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.126928 + 0.313262 + 0.693147, abs=1e-5)  # golden, from the formula


def test_class_weights_weigh_the_training_loss_only():
    weights = torch.tensor([3.0, 0.5])
    per_example = cross_entropy_by_hand(LOGITS, LABELS)
    weighted = SingleLabelObjective(weights)
    assert weighted.training_loss_sum(LOGITS, LABELS).item() == pytest.approx(
        3.0 * per_example[0] + 0.5 * per_example[1] + 3.0 * per_example[2], rel=1e-6
    )
    assert weighted.loss_sum(LOGITS, LABELS).item() == pytest.approx(sum(per_example), rel=1e-6)


def test_an_ignored_label_adds_no_loss_and_no_gradient():
    logits = LOGITS.clone().requires_grad_()
    labels = torch.tensor([0, SingleLabelObjective.IGNORE, 0])
    loss = SingleLabelObjective(torch.tensor([2.0, 1.0])).training_loss_sum(logits, labels)
    per_example = cross_entropy_by_hand(LOGITS, LABELS)
    assert loss.item() == pytest.approx(2.0 * (per_example[0] + per_example[2]), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0


def test_low_precision_logits_are_scored_in_fp32():
    loss = SingleLabelObjective().training_loss_sum(LOGITS.to(torch.bfloat16), LABELS)
    assert loss.dtype == torch.float32


def test_logits_become_probabilities_and_predictions():
    objective = SingleLabelObjective()
    probabilities = objective.scores(LOGITS)
    assert torch.allclose(probabilities.sum(-1), torch.ones(3))
    assert probabilities[0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1), rel=1e-6)
    assert np.array_equal(objective.predictions(LOGITS), [0, 1, 0])


def test_the_numpy_decisions_are_the_objectives_bit_for_bit():
    """One rule, on tensors and on numpy arrays alike: ties go to the first class, and a score at
    a threshold's float32 value reaches it (0.7 rounds down in float32), whatever the threshold's type."""
    logits = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    logits[:4] = 1.0  # ties
    scores = torch.softmax(logits, -1)
    scores[4] = torch.tensor([0.3, 0.7])
    for threshold in (None, 0.3, 0.7, np.float64(0.7)):
        objective, decider = SingleLabelObjective(decision_threshold=threshold), Decider("single_label", decision_threshold=threshold)
        before = scores.argmax(-1).numpy() if threshold is None else (scores[:, 1] >= threshold).long().numpy()  # the rule as it was
        for decided in (objective.decide(scores), objective.decide(scores.numpy()), decider.decide(scores.numpy())):
            assert decided.dtype == before.dtype and np.array_equal(decided, before)
    assert np.array_equal(SingleLabelObjective().predictions(logits.to(torch.bfloat16)), logits.to(torch.bfloat16).argmax(-1).numpy())
    thresholds = np.array([0.7, 0.3])
    multi = torch.sigmoid(logits)
    multi[4] = torch.tensor([0.7, 0.3])
    before = (multi.numpy() >= thresholds).astype(np.int8)
    for decided in (MultiLabelObjective(thresholds=thresholds).decide(multi), Decider("multi_label", thresholds=thresholds).decide(multi.numpy())):
        assert decided.dtype == before.dtype and np.array_equal(decided, before)


@pytest.mark.parametrize("task", ["single_label", "multi_label", "regression"])
def test_numpy_scores_and_fields_match_the_objectives(task):
    logits = torch.randn(64, 1 if task == "regression" else 3, generator=torch.Generator().manual_seed(1)) * 4
    objective = {
        "single_label": SingleLabelObjective(), "multi_label": MultiLabelObjective(thresholds=0.4),
        "regression": RegressionObjective(clip=(-1.0, 1.0)),
    }[task]
    decider = Decider(task, thresholds=0.4, clip=(-1.0, 1.0))
    expected, scores = objective.scores(logits).numpy(), decider.scores(logits.numpy())
    assert scores.dtype == np.float32 and np.allclose(scores, expected, rtol=1e-6, atol=1e-7)
    if task == "regression":
        assert scores.min() == -1.0 and scores.max() == 1.0  # clipped to the range
    names = ["a", "b", "c"][: logits.shape[1]]
    fields = get(task).prediction_fields
    assert [fields(decider, names, row) for row in expected] == [fields(objective, names, row) for row in expected]


def test_moving_to_a_device_keeps_the_weights():
    moved = SingleLabelObjective(torch.tensor([1.0, 2.0])).to(torch.device("cpu"))
    assert torch.equal(moved.class_weights, torch.tensor([1.0, 2.0]))
    unweighted = SingleLabelObjective()
    assert unweighted.to(torch.device("cpu")) is unweighted


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_scale_is_the_factor_clip_grad_norm_applies(max_norm):
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
    clipped_flat = flat * clip_scale(flat.norm(), max_norm)
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    assert torch.allclose(torch.cat([parameter.grad.reshape(-1) for parameter in parameters]), clipped_flat, atol=1e-7)
    assert clip_scale(flat.norm(), max_norm).item() <= 1.0
