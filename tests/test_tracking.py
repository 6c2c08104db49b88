"""Experiment trackers: events mirrored into TensorBoard for real; W&B and MLflow stay optional."""

from __future__ import annotations

import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
from conftest import invoke

from ftcli.config import validate
from ftcli.errors import FtcliError
from ftcli.runs.rundir import RunDir
from ftcli.training.tracking import TENSORBOARD_DIR, Tracker, tracker_scalars

TRAIN_EVENT = {"step": 10, "epoch": 0.5, "train_loss": 0.6, "learning_rate": 5e-5, "grad_norm": 1.5}
EVAL_EVENT = {"step": 20, "epoch": 1.0, "eval_loss": 0.5, "eval_accuracy": 0.75}


def config_for(tmp_path, report_to: list[str]):
    return validate({"name": "tracked", "output_dir": str(tmp_path), "data": {"train": "train.jsonl"}, "report_to": report_to})


def test_scalars_are_grouped_into_train_and_eval():
    assert tracker_scalars(TRAIN_EVENT) == {
        "train/epoch": 0.5,
        "train/loss": 0.6,
        "train/learning_rate": 5e-5,
        "train/grad_norm": 1.5,
    }
    assert tracker_scalars(EVAL_EVENT) == {"train/epoch": 1.0, "eval/loss": 0.5, "eval/accuracy": 0.75}


def test_no_trackers_by_default(tmp_path):
    assert config_for(tmp_path, []).report_to == []
    tracker = Tracker()
    tracker.start(RunDir.create(tmp_path / "run"), config_for(tmp_path, []))
    tracker.log(TRAIN_EVENT)
    tracker.close()
    assert list((tmp_path / "run").iterdir()) == []


def test_tensorboard_receives_every_event(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_for(tmp_path, ["tensorboard"])
    run = RunDir.create(config.run_dir)
    run.config_file.write_text("name: tracked\n")
    tracker = Tracker(config.report_to)
    tracker.start(run, config)
    tracker.log(TRAIN_EVENT)
    tracker.log(EVAL_EVENT)
    tracker.close()

    events = EventAccumulator(str(run.path / TENSORBOARD_DIR))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/accuracy"} <= set(tags)
    assert [(point.step, point.value) for point in events.Scalars("eval/accuracy")] == [(20, 0.75)]
    assert events.Scalars("train/loss")[0].value == pytest.approx(0.6)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_fails_before_training_with_the_install_hint(make_experiment, tmp_path, monkeypatch, name):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *args: None if module == name else find_spec(module, *args))
    with pytest.raises(FtcliError, match=f"pip install 'ftcli\\[{name}\\]'"):
        Tracker([name])

    result = invoke("train", str(make_experiment(report_to=[name])))
    assert result.exit_code == 2
    assert f"report_to names {name}, which is not installed" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing half-made


def test_wandb_and_mlflow_get_params_and_every_event(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("wandb.log", values, step))

        def finish(self):
            calls.append(("wandb.finish",))

    def fake(name: str, **functions) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = ModuleSpec(name, None)
        module.__dict__.update(functions)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    fake("wandb", init=lambda **kwargs: calls.append(("wandb.init", kwargs)) or FakeRun())
    fake(
        "mlflow",
        start_run=lambda run_name: calls.append(("mlflow.start_run", run_name)),
        log_params=lambda params: calls.append(("mlflow.log_params", params)),
        log_metrics=lambda values, step: calls.append(("mlflow.log_metrics", values, step)),
        end_run=lambda: calls.append(("mlflow.end_run",)),
    )
    config = config_for(tmp_path, ["wandb", "mlflow"])
    tracker = Tracker(config.report_to)
    tracker.start(RunDir.create(config.run_dir), config)
    tracker.log(EVAL_EVENT)
    tracker.close()

    init = calls[0][1]
    assert init["name"] == "tracked" and init["config"]["training"]["learning_rate"] == 5e-5
    assert calls[1] == ("mlflow.start_run", "tracked")
    assert calls[2][1]["training.learning_rate"] == 5e-5  # flattened params
    assert ("wandb.log", tracker_scalars(EVAL_EVENT), 20) in calls
    assert ("mlflow.log_metrics", tracker_scalars(EVAL_EVENT), 20) in calls
    assert calls[-2:] == [("wandb.finish",), ("mlflow.end_run",)]


def test_a_tracker_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    module = types.ModuleType("wandb")
    module.__spec__ = ModuleSpec("wandb", None)
    module.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", module)
    config = config_for(tmp_path, ["wandb"])
    with pytest.raises(FtcliError, match="report_to wandb could not start: api_key not configured"):
        Tracker(config.report_to).start(RunDir.create(config.run_dir), config)
