"""The kinds of task ftcli trains: what each predicts, and its defaults.

    single_label   one class per example (softmax, cross-entropy)
    multi_label    any number of labels per example, each yes or no (sigmoid per label, binary cross-entropy)
    regression     one number per example (the raw output, mean squared error or Huber)
"""

from __future__ import annotations

SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label", "multi_label", "regression"
TASKS = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)
CLASSIFICATION = (SINGLE_LABEL, MULTI_LABEL)

# The metrics a run computes when the config names none; the first picks the best model.
DEFAULT_METRICS = {
    SINGLE_LABEL: ["accuracy", "f1"],
    MULTI_LABEL: ["f1_micro", "f1_macro", "subset_accuracy"],
    REGRESSION: ["pearson", "spearman", "mse"],
}

# The losses each task can train on (training.loss), its default first.
LOSSES = {SINGLE_LABEL: ("cross_entropy",), MULTI_LABEL: ("bce",), REGRESSION: ("mse", "huber")}

# transformers' name for the task (config.json problem_type), which pipeline() reads.
PROBLEM_TYPES = {
    SINGLE_LABEL: "single_label_classification",
    MULTI_LABEL: "multi_label_classification",
    REGRESSION: "regression",
}
