"""multi_label and regression, end to end through the CLI on tiny models, in both backends: they
learn a learnable task, write what a run writes, predict in their own schema, match
transformers.pipeline on the saved model, and resume exactly."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke, multi_label_rows, regression_rows, write_rows
from safetensors.torch import load_file

TASKS = {
    # task: (rows, label column, training settings that learn it in seconds)
    "multi_label": (multi_label_rows, "labels", {"epochs": 6, "learning_rate": 3e-3}),
    "regression": (regression_rows, "score", {"epochs": 6, "learning_rate": 5e-3}),
}


def experiment_for(root: Path, model_dir: Path, task: str, backend: str, **training) -> Path:
    rows, field, settings = TASKS[task]
    data = root / "data"
    train = write_rows(data / f"{task}-train.jsonl", rows(128, seed=1))
    validation = write_rows(data / f"{task}-validation.jsonl", rows(32, seed=2))
    experiment = {
        "name": f"{task}-{backend}",
        "task": task,
        "backend": backend,
        "output_dir": str(root / "runs"),
        "model": str(model_dir),
        "data": {"train": str(train), "validation": str(validation), "label_field": field, "max_length": 32},
        "training": {"batch_size": 8, "logging_steps": 4, "precision": "fp32"} | settings | training,
    }
    path = root / f"{task}-{backend}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_four_head_model_dir):
    """One trained run per task and backend, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("tasks")
    runs = {}
    for task in TASKS:
        for backend in ("loop", "trainer"):
            result = invoke("train", str(experiment_for(root, tiny_four_head_model_dir, task, backend)))
            assert result.exit_code == 0, result.output
            runs[task, backend] = root / "runs" / f"{task}-{backend}"
    return runs


@pytest.mark.parametrize("backend", ["loop", "trainer"])
@pytest.mark.parametrize("task", list(TASKS))
def test_the_task_is_learned_and_the_run_says_what_it_is(trained, task, backend):
    run = trained[task, backend]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [event["train_loss"] for event in events if "train_loss" in event]
    assert losses[-1] < 0.8 * losses[0], losses
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    config = json.loads((run / "model" / "config.json").read_text())
    if task == "regression":
        assert validation["pearson"] > 0.8 and set(validation) == {"loss", "pearson", "spearman", "mse"}
        assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}
        assert not (run / "model" / "thresholds.json").exists()
    else:
        assert validation["f1_micro"] > 0.7 and set(validation) == {"loss", "f1_micro", "f1_macro", "subset_accuracy"}
        assert config["problem_type"] == "multi_label_classification"
        assert config["id2label"] == {"0": "positive", "1": "screen"}
        thresholds = json.loads((run / "model" / "thresholds.json").read_text())
        assert thresholds["how"] == "tuned on validation" and set(thresholds["thresholds"]) == {"positive", "screen"}


def test_multi_label_predict_evaluate_and_pipeline_agree(trained, tmp_path):
    run = trained["multi_label", "loop"]
    thresholds = json.loads((run / "model" / "thresholds.json").read_text())["thresholds"]
    texts = ["the film was great and lovely", "the plot was awful and poor", "a movie that was boring"]
    write_rows(tmp_path / "in.jsonl", [{"text": text} for text in texts])
    result = invoke("predict", str(run), "--input", str(tmp_path / "in.jsonl"), "--precision", "fp32")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row in rows:
        assert set(row) == {"text", "predicted_labels", "probabilities"}
        assert row["predicted_labels"] == [name for name, p in row["probabilities"].items() if p >= thresholds[name]]

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run / "model"), top_k=None, device="cpu")
    for row, scores in zip(rows, classify(texts)):
        assert {score["label"]: score["score"] for score in scores} == pytest.approx(row["probabilities"], abs=1e-5)

    written = invoke("predict", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.csv"))
    assert written.exit_code == 0, written.output
    with (tmp_path / "out.csv").open() as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["text", "predicted_labels", "prob_positive", "prob_screen"]
    assert [row["predicted_labels"] for row in table] == [",".join(row["predicted_labels"]) for row in rows]

    evaluated = invoke("evaluate", str(run))
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((run / "eval_validation.json").read_text())
    assert record["per_label"]["labels"] == ["positive", "screen"]
    assert record["per_label"]["thresholds"] == [thresholds["positive"], thresholds["screen"]]
    assert "positive" in rows[0]["predicted_labels"] and "positive" not in rows[1]["predicted_labels"]
    assert sum(record["per_label"]["support"]) == 32  # each label positive in half the validation texts
    assert "per label" in evaluated.output and "support" in evaluated.output


def test_regression_predict_and_pipeline_agree(trained, tmp_path):
    run = trained["regression", "trainer"]
    texts = ["the film was great and lovely and superb", "the plot was awful and poor and boring"]
    result = invoke("predict", str(run), "--text", texts[0], "--precision", "fp32")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert set(row) == {"text", "prediction"} and isinstance(row["prediction"], float)

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run / "model"), device="cpu")
    assert classify(texts[0])[0]["score"] == pytest.approx(row["prediction"], abs=1e-5)
    written = invoke("predict", str(run), "--text", texts[1], "--output", str(tmp_path / "out.csv"))
    assert written.exit_code == 0
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "text,prediction"
    three, none = (json.loads(invoke("predict", str(run), "--text", text).stdout)["prediction"] for text in texts)
    assert three > none + 1  # three positive words score well above none


def test_regression_clips_predictions_to_the_label_range(tmp_path, tiny_model_dir):
    experiment = experiment_for(tmp_path, tiny_model_dir, "regression", "loop", epochs=1, learning_rate=1e-5)
    raw = yaml.safe_load(experiment.read_text())
    raw["data"] |= {"label_range": [1.4, 1.6], "clip_predictions": True}
    experiment.write_text(yaml.safe_dump(raw))
    bad = invoke("train", str(experiment))  # the targets run from 0 to 3: outside [1.4, 1.6]
    assert bad.exit_code == 2 and "is outside data.label_range [1.4, 1.6]" in bad.output
    raw["data"]["label_range"] = [-1, 4]
    experiment.write_text(yaml.safe_dump(raw))
    assert invoke("train", str(experiment)).exit_code == 0
    predicted = json.loads(invoke("predict", str(tmp_path / "runs" / "regression-loop"), "--text", "a film").stdout)
    assert -1 <= predicted["prediction"] <= 4


@pytest.mark.parametrize("backend", ["loop", "trainer"])
@pytest.mark.parametrize("task", list(TASKS))
def test_resume_is_exact_for_every_task(task, backend, tmp_path, tiny_model_dir):
    experiment = experiment_for(
        tmp_path, tiny_model_dir, task, backend, epochs=None, max_steps=40, eval_every=10, save_every=10,
        keep_checkpoints=10, warmup_ratio=0.1,
    )
    torch.set_num_threads(1)
    straight = invoke("train", str(experiment))
    assert straight.exit_code == 0, straight.output
    runs = tmp_path / "runs"
    name = f"{task}-{backend}"
    shutil.copytree(runs / name, runs / "resumed")
    config = runs / "resumed" / "config.yaml"
    config.write_text(config.read_text().replace(f"name: {name}", "name: resumed"))
    resumed = invoke("train", str(experiment), "--set", "name=resumed", "--resume-from", "checkpoint-20")
    assert resumed.exit_code == 0, resumed.output
    assert (runs / "resumed" / "metrics.jsonl").read_text() == (runs / name / "metrics.jsonl").read_text()
    expected, weights = (load_file(runs / run / "model" / "model.safetensors") for run in (name, "resumed"))
    assert all(torch.equal(expected[key], weights[key]) for key in expected)


def test_several_zero_one_columns_and_joined_labels_are_multi_label_data(tmp_path, tiny_model_dir):
    rows = multi_label_rows(64, seed=3)
    jigsaw = [{"text": row["text"], "screen": int("screen" in row["labels"]), "positive": int("positive" in row["labels"])} for row in rows]
    joined = [{"text": row["text"], "labels": "|".join(row["labels"])} for row in rows]
    from ftcli.config import DataConfig
    from ftcli.data.prepare import prepare
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    columns = prepare(DataConfig(train=str(write_rows(tmp_path / "j.csv", jigsaw)), label_fields=["screen", "positive"]), tokenizer, "multi_label")
    separated = prepare(DataConfig(train=str(write_rows(tmp_path / "s.csv", joined)), label_field="labels", label_separator="|"), tokenizer, "multi_label")
    lists = prepare(DataConfig(train=str(write_rows(tmp_path / "l.jsonl", rows)), label_field="labels"), tokenizer, "multi_label")
    assert columns.label_names == ["screen", "positive"] and separated.label_names == lists.label_names == ["positive", "screen"]
    as_lists = np.asarray(lists.splits["train"]["labels"])
    assert np.array_equal(np.asarray(separated.splits["train"]["labels"]), as_lists)
    assert np.array_equal(np.asarray(columns.splits["train"]["labels"])[:, ::-1], as_lists)
    assert (as_lists.sum(axis=1) == 0).sum() == 16  # a quarter of the texts have no label: valid, all zeros
    assert lists.summary["train"].label_counts == {"positive": 32, "screen": 32}
