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


# ---------------------------------------------------------------- multi_label, by hand

# 4 examples x 3 labels
MULTI_TRUE = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
MULTI_PRED = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]])


def test_multi_label_metrics_by_hand():
    # every (example, label) decision: TP 3, FP 1, FN 2, TN 6
    tp, fp, fn = 3, 1, 2
    micro_p, micro_r = tp / (tp + fp), tp / (tp + fn)
    assert compute_builtin("f1_micro", MULTI_PRED, MULTI_TRUE) == pytest.approx(2 * micro_p * micro_r / (micro_p + micro_r))
    assert compute_builtin("precision_micro", MULTI_PRED, MULTI_TRUE) == pytest.approx(micro_p)
    assert compute_builtin("recall_micro", MULTI_PRED, MULTI_TRUE) == pytest.approx(micro_r)
    # per label F1: label 0 (2 TP) 1.0; label 1 (TP 1, FN 1) 2/3; label 2 (FP 1, FN 1) 0
    assert compute_builtin("f1_macro", MULTI_PRED, MULTI_TRUE) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert compute_builtin("subset_accuracy", MULTI_PRED, MULTI_TRUE) == pytest.approx(1 / 4)  # only the empty row
    assert compute_builtin("hamming_loss", MULTI_PRED, MULTI_TRUE) == pytest.approx(3 / 12)
    # per example F1: 2/3, 2/3, 2/3, and the empty row scores 0 (zero_division=0)
    assert compute_builtin("f1_samples", MULTI_PRED, MULTI_TRUE) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 0) / 4)


def test_multi_label_suite_reports_each_label():
    suite = MetricSuite(["f1_micro"], num_labels=3, task="multi_label")
    suite.add_batch(MULTI_PRED[:2], MULTI_TRUE[:2])
    suite.add_batch(MULTI_PRED[2:], MULTI_TRUE[2:])
    assert suite.compute()["f1_micro"] == pytest.approx(compute_builtin("f1_micro", MULTI_PRED, MULTI_TRUE))
    assert suite.per_label["f1"] == pytest.approx([1.0, 2 / 3, 0.0])
    assert suite.per_label["support"] == [2, 2, 1]


# ---------------------------------------------------------------- from probabilities, by hand

PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
LABELS = np.array([0, 1, 0, 1])


def test_probability_metrics_by_hand():
    # ROC AUC of class 1 = P(score of a positive > score of a negative): positives (0.6, 0.2), negatives (0.1, 0.7)
    pairs = [(p, n) for p in (0.6, 0.2) for n in (0.1, 0.7)]
    auc = sum(1.0 if p > n else 0.0 for p, n in pairs) / len(pairs)
    assert compute_builtin("roc_auc", None, LABELS, 2, PROBS, "single_label") == pytest.approx(auc)  # 0.5
    log_loss = -np.mean(np.log([0.9, 0.6, 0.3, 0.2]))
    assert compute_builtin("log_loss", None, LABELS, 2, PROBS, "single_label") == pytest.approx(log_loss)
    brier = np.mean([(0.1 - 0) ** 2, (0.6 - 1) ** 2, (0.7 - 0) ** 2, (0.2 - 1) ** 2])  # of class 1, as sklearn
    assert compute_builtin("brier", None, LABELS, 2, PROBS, "single_label") == pytest.approx(brier)
    from sklearn.metrics import average_precision_score

    assert compute_builtin("average_precision", None, LABELS, 2, PROBS, "single_label") == pytest.approx(
        average_precision_score(LABELS, PROBS[:, 1])
    )


def test_a_suite_keeps_probabilities_only_when_a_metric_needs_them():
    plain = MetricSuite(["accuracy"], num_labels=2)
    plain.add_batch(PROBS.argmax(1), LABELS)  # no probabilities handed in, none needed
    assert not plain.needs_scores and plain.compute() == {"accuracy": 0.5}
    scoring = MetricSuite(["accuracy", "roc_auc"], num_labels=2)
    assert scoring.needs_scores
    with pytest.raises(ValueError):
        scoring.add_batch(PROBS.argmax(1), LABELS)


# ---------------------------------------------------------------- regression, by hand


def test_regression_metrics_by_hand():
    predicted, true = np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0])
    errors = predicted - true  # -0.5, 0, 1
    assert compute_builtin("mse", predicted, true) == pytest.approx((0.25 + 0 + 1) / 3)
    assert compute_builtin("rmse", predicted, true) == pytest.approx(math.sqrt((0.25 + 1) / 3))
    assert compute_builtin("mae", predicted, true) == pytest.approx(1.5 / 3)
    spread = sum((t - true.mean()) ** 2 for t in true)
    assert compute_builtin("r2", predicted, true) == pytest.approx(1 - sum(errors**2) / spread)
    from scipy import stats

    assert compute_builtin("spearman", predicted, true) == pytest.approx(stats.spearmanr(predicted, true)[0])


def test_lower_is_better_for_errors_and_losses():
    from ftcli.metrics import higher_is_better

    assert higher_is_better("f1_macro") and higher_is_better("pearson") and higher_is_better("roc_auc")
    assert not any(higher_is_better(name) for name in ("loss", "mse", "rmse", "mae", "hamming_loss", "log_loss", "brier"))
    assert MetricSuite(["mse"], num_labels=1, task="regression").greater_is_better is False


def test_tuned_thresholds_maximise_each_labels_f1():
    from ftcli.tasks.multi_label import tune_thresholds

    scores = np.array([[0.9, 0.2], [0.35, 0.1], [0.3, 0.6], [0.1, 0.05]])
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    thresholds = tune_thresholds(scores, truth)
    # label 0: a threshold in (0.30, 0.35] catches both positives and nothing else; label 1 has no positive
    assert 0.30 < thresholds[0] <= 0.35 and thresholds[1] == 0.5
    decided = scores >= thresholds
    assert compute_builtin("f1_macro", decided[:, :1].astype(int), truth[:, :1]) == 1.0
