"""Built-in metrics against values computed by hand, and batch-by-batch accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftcli.errors import FtcliError
from ftcli.metrics import MetricSuite, compute_builtin, primary_metric

# 8 examples: TP=3 (idx 0,1,2), FN=1 (idx 3), FP=1 (idx 4), TN=3 (idx 5,6,7)
PREDICTIONS = np.array([1, 1, 1, 0, 1, 0, 0, 0])
REFERENCES = np.array([1, 1, 1, 1, 0, 0, 0, 0])


def test_accuracy_by_hand():
    assert compute_builtin("accuracy", PREDICTIONS, REFERENCES) == 6 / 8


def test_binary_f1_by_hand():
    precision, recall = 3 / 4, 3 / 4
    assert compute_builtin("f1", PREDICTIONS, REFERENCES) == pytest.approx(2 * precision * recall / (precision + recall))


def test_binary_precision_and_recall_by_hand():
    # TP=2 (idx 0, 4), FP=2 (idx 1, 5), FN=1 (idx 6), TN=3
    predictions, references = np.array([1, 1, 0, 0, 1, 1, 0, 0]), np.array([1, 0, 0, 0, 1, 0, 1, 0])
    assert compute_builtin("precision", predictions, references) == pytest.approx(2 / 4)
    assert compute_builtin("recall", predictions, references) == pytest.approx(2 / 3)


def test_matthews_by_hand():
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_builtin("matthews", PREDICTIONS, REFERENCES) == pytest.approx(expected)  # 0.5


def test_pearson_and_spearman_by_hand():
    predictions, references = np.array([1, 2, 3, 4]), np.array([2, 4, 6, 9])
    mean_p, mean_r = 2.5, 5.25
    covariance = sum((p - mean_p) * (r - mean_r) for p, r in zip(predictions, references))
    spread = math.sqrt(sum((p - mean_p) ** 2 for p in predictions) * sum((r - mean_r) ** 2 for r in references))
    assert compute_builtin("pearson", predictions, references) == pytest.approx(covariance / spread)
    assert compute_builtin("spearman", predictions, references) == pytest.approx(1.0)  # same ranks


def test_constant_predictions_give_zero_correlation_not_nan():
    assert compute_builtin("pearson", np.zeros(4), np.array([0, 1, 0, 1])) == 0.0
    assert compute_builtin("matthews", np.zeros(4, dtype=int), np.array([0, 1, 0, 1])) == 0.0


def test_multiclass_f1_precision_and_recall_are_macro():
    predictions, references = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])
    # class 0: f1 1; class 1: p=1 r=.5 f1=2/3; class 2: p=.5 r=1 f1=2/3
    assert compute_builtin("f1", predictions, references, num_labels=3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert compute_builtin("precision", predictions, references, num_labels=3) == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert compute_builtin("recall", predictions, references, num_labels=3) == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_suite_accumulates_batch_by_batch_like_one_batch():
    suite = MetricSuite(["accuracy", "f1", "matthews"], num_labels=2)
    for start in range(0, 8, 3):
        suite.add_batch(PREDICTIONS[start : start + 3], REFERENCES[start : start + 3])
    batched = suite.compute()
    whole = {name: compute_builtin(name, PREDICTIONS, REFERENCES) for name in ("accuracy", "f1", "matthews")}
    assert batched == pytest.approx(whole)
    assert list(batched) == ["accuracy", "f1", "matthews"]
    assert suite.confusion.tolist() == [[3, 1], [1, 3]]  # true 0: TN 3, FP 1; true 1: FN 1, TP 3
    suite.add_batch(np.array([1]), np.array([0]))
    assert suite.compute()["accuracy"] == 0.0  # compute() starts afresh
    assert suite.confusion.tolist() == [[0, 1], [0, 0]]


def test_confusion_counts_every_class_pair_beyond_two_labels():
    suite = MetricSuite(["accuracy"], num_labels=3)
    suite.add_batch(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    suite.add_batch(np.array([0]), np.array([2]))
    suite.compute()
    assert suite.confusion.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]


def test_primary_metric_is_first_builtin_else_loss():
    assert primary_metric(["f1", "accuracy"]) == "f1"
    assert primary_metric(["glue/mrpc"]) == "loss"


def test_evaluate_module_offline_fails_with_builtin_suggestion():
    pytest.importorskip("evaluate")
    with pytest.raises(FtcliError, match="built-in metrics: accuracy"):
        MetricSuite(["glue/mrpc"], num_labels=2)
