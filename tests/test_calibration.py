"""Calibrated probabilities and decision thresholds: a temperature fitted on validation and folded
into the saved model, ECE and the reliability bins, and a two-class threshold tuned for the first
metric."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import invoke, sentiment_rows, write_rows

from ftcli.metrics import compute_builtin, expected_calibration_error, reliability
from ftcli.objective import fit_temperature
from ftcli.tasks.multi_label import MultiLabelObjective
from ftcli.tasks.single_label import SingleLabelObjective, tune_decision_threshold


def test_the_temperature_of_an_over_confident_model_is_found():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=generator)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator).squeeze(1)
    assert fit_temperature(SingleLabelObjective(), true_logits * 3, labels) == pytest.approx(3.0, rel=0.08)
    hot = torch.randn(4000, 2, generator=generator)
    multi = torch.bernoulli(torch.sigmoid(hot), generator=generator)
    assert fit_temperature(MultiLabelObjective(), hot * 2, multi) == pytest.approx(2.0, rel=0.08)


def test_reliability_bins_and_ece_by_hand():
    scores = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    bins = reliability(scores, labels, "single_label", bins=4)  # edges 0.25 0.5 0.75 1
    # confidences 0.95, 0.9 (bin 3: one right), 0.7, 0.55 (bin 2: one right)
    assert bins["count"] == [0, 0, 2, 2]
    assert bins["confidence"][2:] == pytest.approx([0.625, 0.925]) and bins["accuracy"][2:] == [0.5, 0.5]
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.125 + 0.5 * 0.425)
    # The metric's 15 bins put each example alone: gaps 0.05 (0.95, right), 0.9, 0.3 (0.7, right), 0.55.
    assert compute_builtin("ece", None, labels, 2, scores, "single_label") == pytest.approx((0.05 + 0.9 + 0.3 + 0.55) / 4)


def test_the_tuned_threshold_beats_one_half_on_an_imbalanced_set():
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.1).astype(int)  # 10% positives, scored lower than they should be
    second = np.clip(rng.normal(0.2 + 0.2 * labels, 0.1), 0, 1)
    f1 = lambda predictions, truth: compute_builtin("f1", predictions, truth)  # noqa: E731
    threshold = tune_decision_threshold(second, labels, f1)
    assert threshold < 0.5
    assert f1((second >= threshold).astype(int), labels) > f1((second >= 0.5).astype(int), labels) + 0.3


@pytest.fixture(scope="module")
def over_confident_run(tmp_path_factory, tiny_model_dir):
    """Deliberately over-confident: a tiny model trained on the task, its logits then made eight
    times larger (the same decisions, far sharper probabilities), fine-tuned a little more."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("calibration")
    train = write_rows(root / "train.jsonl", sentiment_rows(64, seed=1))
    # A validation set the model partly gets wrong: every fifth label is flipped.
    validation = [row | {"label": ["negative", "positive"][(index % 2) ^ (index % 5 == 0)]} for index, row in enumerate(sentiment_rows(80, seed=2))]
    data = {"train": str(train), "validation": str(write_rows(root / "validation.jsonl", validation)), "max_length": 32}
    base = {"output_dir": str(root / "runs"), "data": data, "training": {"batch_size": 8, "logging_steps": 2, "precision": "fp32"}}
    first = base | {"name": "first", "model": str(tiny_model_dir), "calibration": "none"}
    first["training"] = base["training"] | {"epochs": 4, "learning_rate": 5e-3}
    (root / "first.yaml").write_text(json.dumps(first))
    assert invoke("train", str(root / "first.yaml")).exit_code == 0
    sharp = root / "sharp-model"
    shutil.copytree(root / "runs" / "first" / "model", sharp)
    weights = load_file(sharp / "model.safetensors")
    save_file({name: value * 8 if name.startswith("classifier.") else value for name, value in weights.items()}, sharp / "model.safetensors")
    second = base | {"name": "confident", "model": str(sharp), "decision_threshold": "tuned"}
    second["training"] = base["training"] | {"epochs": None, "max_steps": 2, "learning_rate": 1e-6, "eval_every": 2, "save_every": 2}
    (root / "second.yaml").write_text(json.dumps(second))
    result = invoke("train", str(root / "second.yaml"))
    assert result.exit_code == 0, result.output
    return root / "runs" / "confident"


def test_calibration_lowers_ece_keeps_the_predictions_and_lives_in_the_saved_model(over_confident_run):
    record = json.loads((over_confident_run / "model" / "calibration.json").read_text())
    assert record["temperature"] > 1  # over-confident: the probabilities were too sharp
    assert record["after"]["ece"] < record["before"]["ece"]
    assert record["after"]["log_loss"] < record["before"]["log_loss"]

    # The saved model's own probabilities are the calibrated ones: pipeline() gives them too.
    from transformers import pipeline

    text = "the film was great and lovely"
    classify = pipeline("text-classification", model=str(over_confident_run / "model"), top_k=None, device="cpu")
    predicted = json.loads(invoke("predict", str(over_confident_run), "--text", text, "--precision", "fp32").stdout)
    assert {score["label"]: score["score"] for score in classify([text])[0]} == pytest.approx(predicted["probabilities"], abs=1e-5)
    # and its decisions are those of the uncalibrated checkpoint it came from (a positive scale keeps the order).
    best = json.loads((over_confident_run / "metrics.json").read_text())["train"]["best_checkpoint"]
    from safetensors.torch import load_file

    kept, trained = load_file(over_confident_run / "model" / "model.safetensors"), load_file(f"{best}/model.safetensors")
    assert torch.allclose(kept["classifier.weight"] * record["temperature"], trained["classifier.weight"], atol=1e-6)


def test_a_tuned_decision_threshold_is_saved_used_and_named(over_confident_run):
    thresholds = json.loads((over_confident_run / "model" / "thresholds.json").read_text())
    assert list(thresholds["thresholds"]) == ["positive"] and thresholds["how"] == "tuned on validation for accuracy"
    assert thresholds["effect"]["at_tuned"] >= thresholds["effect"]["at_0.5"]
    threshold = thresholds["thresholds"]["positive"]
    rows = [json.loads(line) for line in invoke("predict", str(over_confident_run), "--input", str(over_confident_run.parent.parent / "validation.jsonl")).stdout.splitlines()]
    assert all((row["predicted_label"] == "positive") == (row["probabilities"]["positive"] >= threshold) for row in rows)
    evaluated = invoke("evaluate", str(over_confident_run))
    assert evaluated.exit_code == 0 and f"decision threshold {threshold:.2f}" in evaluated.output
