"""ftcli sweep: trials as run directories, a study that resumes, pruning, the summary and best.yaml."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from conftest import invoke

from ftcli.config import load_config, validate
from ftcli.errors import FtcliError

QUICK = {"max_steps": 4, "eval_every": 2, "save_every": 2, "logging_steps": 2}
SPACE = {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "training.batch_size": [8, 16]}


def read_trials(sweep_dir) -> list[dict]:
    with (sweep_dir / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def test_sweep_runs_trials_as_runs_writes_summary_and_best_config_and_resumes(make_experiment, tmp_path):
    experiment = make_experiment(training=QUICK, sweep=SPACE)
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    first = invoke("sweep", str(experiment), "--trials", "2")
    assert first.exit_code == 0, first.output

    rows = read_trials(sweep_dir)
    assert [row["trial"] for row in rows] == ["0", "1"] and {row["state"] for row in rows} == {"complete"}
    for row in rows:  # each trial is a normal, complete run directory with its own values
        run = sweep_dir / f"tiny-trial-{row['trial']}"
        assert row["run_dir"] == str(run)
        assert (run / "model" / "model.safetensors").is_file()
        trained = load_config(run / "config.yaml")
        assert trained.training.batch_size == int(row["training.batch_size"])
        assert trained.training.learning_rate == pytest.approx(float(row["training.learning_rate"]))
        assert 1e-4 <= trained.training.learning_rate <= 1e-2 and trained.sweep is None
        assert float(row["accuracy"]) == json.loads((run / "metrics.json").read_text())["validation"]["accuracy"]
    assert "tiny-trial-0" in first.output and "best config" in first.output

    best = load_config(sweep_dir / "best.yaml")
    best_row = max(rows, key=lambda row: (float(row["accuracy"]), -int(row["trial"])))
    assert best.name == "tiny-best" and best.sweep is None and best.output_dir == str(tmp_path / "runs")
    assert best.training.batch_size == int(best_row["training.batch_size"])

    # An interrupted trial stays 'running' in the study; the next sweep marks it failed and goes on
    # until the study holds 3 finished trials.
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    study.ask()
    again = invoke("sweep", str(experiment), "--trials", "3")
    assert again.exit_code == 0, again.output
    rows = read_trials(sweep_dir)
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "complete"), ("1", "complete"), ("2", "fail"), ("3", "complete")]
    assert "1 run now" in again.output
    assert "0 run now" in invoke("sweep", str(experiment), "--trials", "3").output  # the study is complete


@pytest.mark.parametrize("backend", ["trainer", "loop"])
def test_pruned_trials_end_as_complete_early_stopped_runs_and_the_study_goes_on(make_experiment, tmp_path, monkeypatch, backend):
    # A pruner that prunes every trial from its second evaluation on (step 4 of 6): accuracy is never above 1.1.
    pruner = optuna.pruners.ThresholdPruner(lower=1.1, n_warmup_steps=3)
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **_: pruner)
    experiment = make_experiment(backend=backend, training=QUICK | {"max_steps": 6}, sweep={"training.batch_size": [8, 16]})
    result = invoke("sweep", str(experiment), "--trials", "2")
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "tiny-sweep"

    rows = read_trials(sweep_dir)
    assert [row["state"] for row in rows] == ["pruned", "pruned"]
    for row in rows:
        run = sweep_dir / f"tiny-trial-{row['trial']}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["train"]["global_step"] == 4 and metrics["train"]["stopped_early"]
        assert (run / "model" / "model.safetensors").is_file() and not (run / "checkpoints" / ".partial").exists()
        assert float(row["accuracy"]) == pytest.approx(metrics["validation"]["accuracy"])
    assert "pruned at step 4" in result.output
    assert not (sweep_dir / "best.yaml").exists()  # no trial completed


def test_search_space_mistakes_are_reported_before_any_trial(make_experiment, tmp_path):
    experiment = make_experiment(training=QUICK, sweep={"training.batch_size": [0, 8], "training.warmup_ratio": {"low": 0.5, "high": 1.5}})
    result = invoke("sweep", str(experiment), "--trials", "2")
    assert result.exit_code == 2
    assert "training.batch_size=0" in result.output and "training.warmup_ratio=1.5" in result.output
    assert not (tmp_path / "runs").exists()

    no_space = invoke("sweep", str(make_experiment(training=QUICK)), "--trials", "2")
    assert no_space.exit_code == 2 and "no sweep: section" in no_space.output

    fine = make_experiment(training=QUICK, sweep={"training.batch_size": [8]})
    nowhere = invoke("sweep", str(fine), "--trials", "1", "--storage", f"sqlite:///{tmp_path / 'missing' / 'study.db'}")
    assert nowhere.exit_code == 2 and "cannot open the study" in nowhere.output
    assert not (tmp_path / "runs").exists()


def test_a_study_refuses_another_search_space(make_experiment, tmp_path):
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    first = invoke("sweep", str(make_experiment(training=QUICK, sweep={"training.batch_size": [8]})), "--trials", "1", "--storage", storage)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "runs" / "tiny-sweep" / "study.db").exists()
    changed = invoke("sweep", str(make_experiment(training=QUICK, sweep={"training.batch_size": [16]})), "--trials", "2", "--storage", storage)
    assert changed.exit_code == 2
    assert "searched another space" in changed.output


def test_sweep_section_is_checked_when_the_config_loads():
    base = {"name": "x", "data": {"train": "t.jsonl"}}
    assert validate(base | {"sweep": SPACE}).sweep["training.batch_size"] == [8, 16]
    with pytest.raises(FtcliError, match="unknown key 'training.learnin_rate'; did you mean 'training.learning_rate'"):
        validate(base | {"sweep": {"training.learnin_rate": [1e-5]}})
    with pytest.raises(FtcliError, match="low=0.1 must be below high=0.01"):
        validate(base | {"sweep": {"training.learning_rate": {"low": 0.1, "high": 0.01}}})
    with pytest.raises(FtcliError, match="log: true needs low > 0"):
        validate(base | {"sweep": {"training.weight_decay": {"low": 0, "high": 0.1, "log": True}}})
    with pytest.raises(FtcliError, match="the list of choices is empty"):
        validate(base | {"sweep": {"training.batch_size": []}})
    with pytest.raises(FtcliError, match=r"give \{low, high, log\} or a list of choices"):
        validate(base | {"sweep": {"training.batch_size": 8}})
