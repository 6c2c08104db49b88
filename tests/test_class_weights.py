"""training.class_weights: each training example's loss weighted by its class, in both backends."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import invoke, write_rows

from ftcli.errors import FtcliError
from ftcli.tasks.single_label import class_weights


def prepared_with(counts: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(label_names=list(counts), summary={"train": SimpleNamespace(label_counts=counts)})


def test_balanced_weights_are_examples_over_classes_times_class_examples():
    weights = class_weights("balanced", prepared_with({"a": 30, "b": 10}))
    assert weights.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert class_weights([1.0, 4.0], prepared_with({"a": 30, "b": 10})).tolist() == [1.0, 4.0]
    assert class_weights(None, prepared_with({"a": 30, "b": 10})) is None


def test_balanced_weights_need_every_class_in_the_training_data():
    with pytest.raises(FtcliError, match="label 'b' has no training examples"):
        class_weights("balanced", prepared_with({"a": 30, "b": 0}))


def train_losses(make_experiment, tmp_path, backend: str, name: str, weights: str) -> list[float]:
    experiment = make_experiment(
        backend=backend,
        # No clipping, which would scale some steps' gradients but not others.
        training={"max_steps": 6, "logging_steps": 2, "eval_every": 6, "save_every": 6, "max_grad_norm": None},
    )
    result = invoke("train", str(experiment), "--set", f"name={name}", "--set", f"training.class_weights={weights}")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / name
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [event["train_loss"] for event in events if "train_loss" in event]


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_weights_scale_each_examples_loss(backend, make_experiment, tmp_path):
    plain = train_losses(make_experiment, tmp_path, backend, "plain", "[1, 1]")
    tripled = train_losses(make_experiment, tmp_path, backend, "tripled", "[3, 3]")
    # AdamW takes (nearly) the same steps for a loss scaled by a constant: every logged loss is three times as large.
    assert tripled == pytest.approx([3 * loss for loss in plain], rel=1e-4)


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_heavier_class_is_predicted_more(backend, make_experiment, tmp_path):
    predicted_positive = {}
    for weights in ("[1, 100]", "[100, 1]"):
        name = "pos" if weights == "[1, 100]" else "neg"
        train_losses(make_experiment, tmp_path, backend, name, weights)
        assert invoke("evaluate", str(tmp_path / "runs" / name)).exit_code == 0
        counts = json.loads((tmp_path / "runs" / name / "eval_validation.json").read_text())["confusion_matrix"]["counts"]
        predicted_positive[name] = counts[0][1] + counts[1][1]
    assert predicted_positive["pos"] > predicted_positive["neg"]


def test_balanced_positive_weights_are_negatives_over_positives_per_label(tmp_path, tiny_model_dir, caplog):
    import logging

    from transformers import AutoTokenizer

    from ftcli.config import DataConfig
    from ftcli.data.prepare import prepare
    from ftcli.tasks.multi_label import positive_weights

    rows = [{"text": f"text {index}", "labels": ["joy"] if index % 4 == 0 else []} for index in range(8)]
    train = write_rows(tmp_path / "train.jsonl", rows)
    data = DataConfig(train=str(train), label_field="labels", label_names=["joy", "fear"])
    prepared = prepare(data, AutoTokenizer.from_pretrained(tiny_model_dir), "multi_label")
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        weights = positive_weights("balanced", prepared)
    assert weights.tolist() == [6 / 2, 1.0]  # joy: 6 negatives, 2 positives; fear: no positive, weight 1
    assert any("fear without a positive training example" in record.getMessage() for record in caplog.records)
    assert positive_weights([2.0, 5.0], prepared).tolist() == [2.0, 5.0]
