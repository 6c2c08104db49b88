"""Options that would be ignored without a word are refused (or, for the other backend's own
options, named), and a moved run directory resumes where it is now."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml
from conftest import invoke, write_rows
from safetensors.torch import load_file

from ftcli.config import validate
from ftcli.errors import FtcliError

BASE = {"name": "x", "data": {"train": "t.jsonl", "validation": "v.jsonl"}}


def with_(base: dict, **sections) -> dict:
    merged = json.loads(json.dumps(base))
    for key, value in sections.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    return merged


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (with_(BASE, thresholds=0.3), "thresholds is for task: multi_label"),
        (with_(BASE, task="regression", thresholds=0.3), "thresholds is for task: multi_label"),
        (with_(BASE, data={"label_separator": ";"}), "data.label_separator"),
        (with_({"name": "x", "data": {"train": "t.jsonl"}}, training={"early_stopping_patience": 2}), "early_stopping_patience"),
        (with_({"name": "x", "data": {"train": "t.jsonl"}}, decision_threshold="tuned"), "decision_threshold: tuned"),
    ],
    ids=["thresholds-single-label", "thresholds-regression", "separator", "patience", "tuned"],
)
def test_an_option_that_would_be_ignored_is_refused_with_the_fix(raw, named):
    with pytest.raises(FtcliError) as caught:
        validate(raw)
    assert named in str(caught.value)


def test_the_options_still_pass_where_they_act():
    validate(with_(BASE, task="multi_label", thresholds=0.3, data={"label_separator": ";"}))
    validate(with_(BASE, data={"long_text": "window", "stride": 64, "max_length": 256}))
    validate(with_(BASE, training={"early_stopping_patience": 2}, decision_threshold="tuned"))
    # A cross-validation fold holds out its own validation split.
    validate(with_({"name": "x", "data": {"train": "t.jsonl", "fold": {"folds": 3, "index": 0}}}, decision_threshold="tuned"))


def test_a_tuned_decision_threshold_with_three_classes_is_refused_before_training(make_experiment, tmp_path):
    experiment = make_experiment(decision_threshold="tuned", training={"max_steps": 2})
    train_file = tmp_path / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    rows[0]["label"] = "neutral"
    write_rows(train_file, rows)
    result = invoke("train", str(experiment))
    assert result.exit_code == 2
    assert "decision_threshold=tuned decides between two classes; the data has 3" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists(), "nothing is written"


def test_the_trainer_backend_names_the_loop_options_it_ignores(make_experiment, caplog):
    from ftcli.config import load_config
    from ftcli.training.trainer import TrainerBackend

    config = load_config(make_experiment(backend="trainer", training={"compile": "cuda_graphs", "fused_kernels": True}))
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        TrainerBackend().check(config)
    assert "training.compile is an option of the loop backend" in caplog.text
    assert "training.fused_kernels" in caplog.text and "data_on_device" not in caplog.text


@pytest.fixture
def finished_run(make_experiment, tmp_path):
    experiment = make_experiment(training={"max_steps": 4, "eval_every": 2, "save_every": 2, "keep_checkpoints": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    return experiment, tmp_path / "runs" / "tiny"


def test_a_moved_run_resumes_where_it_is_now(finished_run, tmp_path, caplog):
    _, old = finished_run
    new = tmp_path / "bigger-disk" / "tiny"
    shutil.copytree(old, new)
    old_events = (old / "metrics.jsonl").read_text()
    shutil.rmtree(new / "model")
    (new / "metrics.json").unlink()

    with caplog.at_level(logging.WARNING, logger="ftcli"):
        resumed = invoke("train", str(new), "--resume-from", "checkpoint-2")
    assert resumed.exit_code == 0, resumed.output
    assert f"continues in {new}" in caplog.text
    assert json.loads((new / "metrics.json").read_text())["train"]["resumed_from"] == str(new / "checkpoints" / "checkpoint-2")
    assert yaml.safe_load((new / "config.yaml").read_text())["output_dir"] == str(new.parent)
    # Exact resume, in the new place; the old run is untouched.
    expected, weights = load_file(old / "model" / "model.safetensors"), load_file(new / "model" / "model.safetensors")
    assert all((expected[name] == weights[name]).all() for name in expected)
    assert (old / "metrics.jsonl").read_text() == old_events
    assert (new / "metrics.jsonl").read_text() == old_events


def test_a_config_that_differs_only_in_output_dir_resumes(finished_run, tmp_path):
    experiment, old = finished_run
    shutil.copytree(old, tmp_path / "elsewhere" / "tiny")
    resumed = invoke("train", str(experiment), "--resume", "--set", f"output_dir={tmp_path / 'elsewhere'}")
    assert resumed.exit_code == 0, resumed.output
    changed = invoke("train", str(experiment), "--resume", "--set", "training.learning_rate=1e-3")
    assert changed.exit_code == 2 and "training.learning_rate" in changed.output
