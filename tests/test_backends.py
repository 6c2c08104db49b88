"""What both backends do when training goes wrong: a loss that turns nan stops the run before it
saves anything after it."""

from __future__ import annotations

import pytest
import torch
from conftest import invoke

from ftcli.rundir import RunDir


@pytest.fixture
def loss_nan_from_step(monkeypatch):
    """Make the training loss nan from the given optimizer step on (one micro-batch per step);
    evaluation, which runs without gradients, keeps its real loss."""

    def from_step(bad_step: int) -> None:
        cross_entropy = torch.nn.functional.cross_entropy
        calls = 0

        def poisoned(*args, **kwargs):
            nonlocal calls
            loss = cross_entropy(*args, **kwargs)
            if torch.is_grad_enabled():
                calls += 1
                if calls >= bad_step:
                    return loss * float("nan")
            return loss

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)

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
