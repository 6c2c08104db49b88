"""End to end through the CLI with the Trainer backend: train, evaluate, predict, run directory."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import invoke
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


def test_train_writes_complete_run_directory_and_learns(make_experiment, tmp_path):
    experiment = make_experiment(backend="trainer", training={"epochs": 3})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"

    for name in ("config.yaml", "env.json", "metrics.jsonl", "metrics.json", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("pytorch_model*")), "weights must be safetensors"
    assert all((c / "model.safetensors").is_file() for c in (run / "checkpoints").iterdir())
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints and all(name.startswith("checkpoint-") for name in checkpoints)

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["training"]["learning_rate"] == 5e-3
    assert resolved["training"]["scheduler"] == "linear"  # defaults are written out too

    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "transformers", "datasets", "accelerate", "device", "command"} <= set(env)

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "train_loss" in e]
    eval_events = [e for e in events if "eval_loss" in e]
    assert len(eval_events) == 3 and all("eval_accuracy" in e and "eval_f1" in e for e in eval_events)
    assert all({"step", "epoch", "learning_rate"} <= set(e) for e in train_events)
    assert train_events[-1]["train_loss"] < train_events[0]["train_loss"]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] >= 0.75  # the task is learnable: chance is 0.5
    assert metrics["train"]["global_step"] == 3 * 128 // 8

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert set(load_file(run / "model" / "model.safetensors"))  # loadable safetensors


def test_existing_run_directory_is_refused_without_overwrite(make_experiment, tmp_path, isolated_cache):
    experiment = make_experiment(backend="trainer", training={"max_steps": 2, "eval_every": 2, "save_every": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    cached = set(isolated_cache.rglob("*"))
    refused = invoke("train", str(experiment), "--set", "data.max_length=24")  # data that would need tokenizing
    assert refused.exit_code == 2
    assert "already exists" in refused.output and "--overwrite" in refused.output
    assert set(isolated_cache.rglob("*")) == cached  # refused before tokenizing
    assert invoke("train", str(experiment), "--overwrite").exit_code == 0


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_run_too_short_to_log_still_ends_well(backend, make_experiment, tmp_path):
    experiment = make_experiment(backend=backend, data={"validation": None}, training={"max_steps": 2, "logging_steps": 10})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert (run / "model" / "model.safetensors").is_file() and not (run / "curves.png").exists()
    assert json.loads((run / "metrics.json").read_text())["train"]["global_step"] == 2


def test_evaluate_and_predict_on_a_trained_run(make_experiment, tmp_path):
    experiment = make_experiment(backend="trainer", pair=True, training={"epochs": 3})
    assert invoke("train", str(experiment)).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    train_metrics = json.loads((run / "metrics.json").read_text())["validation"]

    evaluated = invoke("evaluate", str(run))
    assert evaluated.exit_code == 0, evaluated.output
    written = json.loads((run / "eval_validation.json").read_text())
    assert abs(written["accuracy"] - train_metrics["accuracy"]) < 1e-9
    # The confusion matrix: a row per true label, as many examples as the split, accuracy on its diagonal.
    confusion = written["confusion_matrix"]
    counts = confusion["counts"]
    labels = [json.loads(line)["label"] for line in (tmp_path / "data" / "validation.jsonl").read_text().splitlines()]
    assert [sum(row) for row in counts] == [labels.count(int(name)) for name in confusion["labels"]]
    assert sum(counts[i][i] for i in range(len(counts))) / len(labels) == pytest.approx(written["accuracy"])
    assert "confusion matrix" in evaluated.output

    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    assert invoke("evaluate", str(run), "--checkpoint", str(checkpoint)).exit_code == 0
    assert (checkpoint / "eval_validation.json").is_file()

    inline = invoke("predict", str(run), "--text", "the film was great", "--text-pair", "a lovely story")
    assert inline.exit_code == 0, inline.output
    row = json.loads(inline.stdout.strip().splitlines()[-1])
    assert row["predicted_label"] in ("0", "1")
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
    assert row["probability"] == max(row["probabilities"].values())

    output = tmp_path / "predictions.csv"
    source = tmp_path / "data" / "validation.jsonl"
    assert invoke("predict", str(run), "--input", str(source), "--output", str(output)).exit_code == 0
    lines = output.read_text().splitlines()
    assert lines[0].split(",")[-3:] == ["probability", "prob_0", "prob_1"]
    assert len(lines) == 1 + 32
