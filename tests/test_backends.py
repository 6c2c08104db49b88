"""What both backends do when training goes wrong: a loss that turns nan stops the run before it
saves anything after it; a signal asks for a checkpoint and a stop (end to end in test_resume.py)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import invoke

import ftcli.training.stopping
from ftcli.training.stopping import LossWatch, StopSignals
from ftcli.runs.rundir import RunDir


@pytest.fixture
def loss_nan_from_step(monkeypatch):
    """Make the training loss nan from the given optimizer step on (one micro-batch per step);
    evaluation, which runs without gradients, keeps its real loss. The loss is multiplied by a
    tensor that turns nan once the step before is observed: a step replayed as a CUDA graph does
    that multiplication too, where a switch in Python would run only while the graph is captured."""

    def from_step(bad_step: int) -> None:
        cross_entropy, observe = torch.nn.functional.cross_entropy, LossWatch.observe
        factors: dict[torch.device, torch.Tensor] = {}

        def poisoned(*args, **kwargs):
            loss = cross_entropy(*args, **kwargs)
            if not torch.is_grad_enabled():
                return loss
            factor = factors.setdefault(loss.device, torch.ones((), device=loss.device))
            return loss * factor.clone()  # backward keeps the clone: the factor may turn nan before it runs

        def observe_then_poison(self, loss, optimizer_step):
            observe(self, loss, optimizer_step)
            if optimizer_step == bad_step - 1:
                for factor in factors.values():
                    factor.fill_(float("nan"))

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
        monkeypatch.setattr(LossWatch, "observe", observe_then_poison)

    return from_step


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_nan_loss_stops_training_before_the_next_checkpoint(backend, make_experiment, tmp_path, loss_nan_from_step):
    experiment = make_experiment(
        train_size=64, backend=backend, training={"max_steps": 8, "eval_every": 2, "save_every": 2, "logging_steps": 2}
    )
    loss_nan_from_step(5)
    result = invoke("train", str(experiment))
    assert result.exit_code == 2, result.output
    assert "loss became nan at step 5; the last good checkpoint is checkpoint-4" in result.output
    assert "learning_rate" in result.output
    run = RunDir(tmp_path / "runs" / "tiny")
    assert [p.name for p in run.list_checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert not run.model_dir.exists() and not run.lock_file.exists()


def test_stop_signals_record_the_first_signal_and_restore_the_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop_signals:
        assert stop_signals.requested(1) == 0
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: recorded, not a KeyboardInterrupt
        assert stop_signals.requested(2) == signal.SIGINT  # one process: at the next step
        assert signal.getsignal(signal.SIGINT) is before[0]  # a second Ctrl-C aborts at once
        error = stop_signals.interrupted(RunDir(tmp_path), 7)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert error.exit_code == 130
    assert str(error) == f"interrupted at step 7: checkpoint-7 saved; continue with ftcli train {tmp_path} --resume"


def test_several_processes_agree_on_a_signal_every_few_steps_only(monkeypatch):
    """Agreeing waits for the GPU: at every step it would stop the host from running ahead."""

    class TwoProcesses:
        num_processes = 2
        device = torch.device("cpu")

    agreements = []
    monkeypatch.setattr(ftcli.training.stopping, "PartialState", TwoProcesses)
    monkeypatch.setattr(ftcli.training.stopping, "reduce", lambda flag, op: agreements.append(op) or flag)
    stop_signals = StopSignals()
    stop_signals.signal_number = signal.SIGTERM  # reached this process only, mid-interval
    steps = range(1, 2 * StopSignals.AGREE_EVERY + 1)
    stopping = [step for step in steps if stop_signals.requested(step)]
    assert stopping == [StopSignals.AGREE_EVERY, 2 * StopSignals.AGREE_EVERY]
    assert agreements == ["max", "max"]
