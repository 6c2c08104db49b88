"""Checkpoints for machines that may be taken away: save_every between evaluations, checkpoints by
the clock (training.save_every_minutes), and --resume-auto. Every resumed or clock-saved run ends
with the same weights (bit for bit, on the CPU) and the same metrics as a plain uninterrupted one.

Interruptions happen in this process: StopSignals is told a SIGTERM arrived at a chosen step, so
the run saves there and stops as under a real one (tests/test_resume.py sends real signals)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file

from ftcli.training import timed_saves
from ftcli.training.stopping import StopSignals

STEPS = 16  # 2 epochs of 64 examples in batches of 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def experiment_for(make_experiment, backend: str, **training):
    settings = {"epochs": 2, "eval_every": 4, "save_every": 3, "logging_steps": 2, "keep_checkpoints": 2} | training
    return make_experiment(train_size=64, backend=backend, training=settings)


def sigterm_at(monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    """The next run behaves as if a SIGTERM reached it just before optimizer step `stop_step` ended."""

    def requested(self: StopSignals, optimizer_step: int) -> int:
        if optimizer_step == stop_step:
            self.signal_number = signal.SIGTERM
        return self.signal_number

    monkeypatch.setattr(StopSignals, "requested", requested)


def steps_of(run: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in (run / "checkpoints").glob("checkpoint-*"))


def assert_same_run(expected: Path, actual: Path) -> None:
    """The same final weights, bit for bit, the same scores and the same logged events."""
    weights, expected_weights = load_file(actual / "model" / "model.safetensors"), load_file(expected / "model" / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[name], expected_weights[name]) for name in weights)
    metrics, expected_metrics = (json.loads((run / "metrics.json").read_text()) for run in (actual, expected))
    assert metrics["validation"] == expected_metrics["validation"]
    for key in ("global_step", "epoch", "train_samples", "best_score"):
        assert metrics["train"][key] == expected_metrics["train"][key], key
    assert (actual / "metrics.jsonl").read_text() == (expected / "metrics.jsonl").read_text()


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_checkpoint_between_evaluations_resumes_exactly(backend, make_experiment, tmp_path, monkeypatch):
    experiment = experiment_for(make_experiment, backend)
    runs = tmp_path / "runs"
    assert invoke("train", str(experiment), "--set", "name=straight").exit_code == 0
    straight = json.loads((runs / "straight" / "metrics.json").read_text())["train"]
    # The best model is an evaluated checkpoint (every 4 steps), and retention kept it beside the 2 newest.
    best_step = int(Path(straight["best_checkpoint"]).name.split("-")[1])
    assert best_step % 4 == 0
    assert best_step in steps_of(runs / "straight") and steps_of(runs / "straight")[-2:] == [15, 16]

    sigterm_at(monkeypatch, 10)
    stopped = invoke("train", str(experiment), "--set", "name=stopped")
    assert stopped.exit_code == 143, stopped.output
    assert steps_of(runs / "stopped")[-2:] == [9, 10]  # save_every=3 checkpointed step 9, between evaluations
    monkeypatch.undo()

    resumed = invoke("train", str(experiment), "--set", "name=stopped", "--resume-from", "checkpoint-9")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((runs / "stopped" / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-9")
    assert_same_run(runs / "straight", runs / "stopped")


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_save_every_minutes_checkpoints_by_the_clock_and_changes_no_number(backend, make_experiment, tmp_path, monkeypatch):
    # Step saves only at the end; evaluations every 8 steps (a multiple of save_every 16: none added).
    experiment = experiment_for(make_experiment, backend, eval_every=8, save_every=16, keep_checkpoints=20)
    runs = tmp_path / "runs"
    assert invoke("train", str(experiment), "--set", "name=plain").exit_code == 0
    assert steps_of(runs / "plain") == [16]

    # Each reading of the clock takes a second: one at every step and one at every save, so three
    # seconds (0.05 minutes) pass every three steps.
    now = iter(range(10**6))
    monkeypatch.setattr(timed_saves, "clock", lambda: float(next(now)))
    timed = invoke("train", str(experiment), "--set", "name=timed", "--set", "training.save_every_minutes=0.05")
    assert timed.exit_code == 0, timed.output
    assert steps_of(runs / "timed") == [3, 6, 9, 12, 15, 16]
    # The clock's checkpoints are resume points: the best model is chosen as without them.
    best = [json.loads((runs / name / "metrics.json").read_text())["train"]["best_checkpoint"] for name in ("plain", "timed")]
    plain_best, timed_best = (Path(path).name if path else None for path in best)
    assert timed_best == plain_best
    assert_same_run(runs / "plain", runs / "timed")


def test_resume_auto_starts_a_new_run_and_continues_an_interrupted_one(make_experiment, tmp_path, monkeypatch):
    experiment = experiment_for(make_experiment, "loop")
    runs = tmp_path / "runs"
    fresh = invoke("train", str(experiment), "--set", "name=straight", "--resume-auto")
    assert fresh.exit_code == 0, fresh.output
    assert "resumed_from" not in json.loads((runs / "straight" / "metrics.json").read_text())["train"]

    sigterm_at(monkeypatch, 7)
    assert invoke("train", str(experiment), "--set", "name=job", "--resume-auto").exit_code == 143
    monkeypatch.undo()
    again = invoke("train", str(experiment), "--set", "name=job", "--resume-auto")  # the job script, rerun
    assert again.exit_code == 0, again.output
    assert json.loads((runs / "job" / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-7")
    assert_same_run(runs / "straight", runs / "job")

    # Killed before its first checkpoint: nothing to continue, so it starts over what was left.
    (runs / "early").mkdir()
    (runs / "early" / "config.yaml").write_text((runs / "job" / "config.yaml").read_text())
    started = invoke("train", str(experiment), "--set", "name=early", "--resume-auto")
    assert started.exit_code == 0, started.output
    assert_same_run(runs / "straight", runs / "early")

    both = invoke("train", str(experiment), "--set", "name=job", "--resume-auto", "--overwrite")
    assert both.exit_code == 2 and "--resume-auto" in both.output
