"""Checkpoints: retention keeps the newest and the best, half-written saves are never resumed from,
and RNG states survive torch.load(weights_only=True)."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import threading
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from conftest import invoke

from ftcli.runs import checkpoints as checkpoint
from ftcli.reporting.report import analyze_run
from ftcli.training.loop import checkpointing
from ftcli.training.recipe import train
from ftcli.config import load_config
from ftcli.errors import FtcliError
from ftcli.runs.rundir import RunDir


def fake_checkpoints(run: RunDir, steps: list[int], backend: str = "loop") -> None:
    for step in steps:
        folder = run.checkpoint_dir(step)
        folder.mkdir(parents=True)
        (folder / checkpoint.STATE_FILES[backend]).write_text("{}")


def test_prune_keeps_the_newest_and_the_best_and_clears_half_written_saves(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoints(run, [2, 4, 6, 8, 10])
    checkpoint.staging_dir(run.checkpoint_dir(12)).mkdir(parents=True)
    checkpoint.prune(run, keep=2, best=run.checkpoint_dir(4))
    checkpoint.clear_staging(run)
    assert [p.name for p in run.list_checkpoints()] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")] == []


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoints(run, [2, 4])
    # A save killed midway stays under its staging name: never a candidate.
    checkpoint.staging_dir(run.checkpoint_dir(6)).mkdir(parents=True)
    assert checkpoint.resume_point(run, None, "loop") == run.checkpoint_dir(4)
    assert checkpoint.resume_point(run, "2", "loop") == run.checkpoint_dir(2)
    assert checkpoint.resume_point(run, "checkpoint-2", "loop") == run.checkpoint_dir(2)
    with pytest.raises(FtcliError, match="not a checkpoint of the trainer backend"):
        checkpoint.resume_point(run, None, "trainer")
    with pytest.raises(FtcliError, match="checkpoint-2, checkpoint-4"):
        checkpoint.resume_point(run, "6", "loop")


def test_rewind_forgets_checkpoints_and_events_after_the_resume_point(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoints(run, [2, 4, 6])
    for step in (1, 2, 3, 4, 5):
        run.log_event({"step": step, "train_loss": 1.0 / step})
    checkpoint.rewind(run, run.checkpoint_dir(2))
    assert [p.name for p in run.list_checkpoints()] == ["checkpoint-2"]
    assert [event["step"] for event in run.read_events()] == [1, 2]


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    def draw() -> tuple:
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = draw()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_training_keeps_the_last_checkpoints_and_the_best(backend, make_experiment, tmp_path):
    experiment = make_experiment(
        backend=backend,
        metrics=["accuracy"],
        training={"epochs": 3, "eval_every": 4, "save_every": 4, "keep_checkpoints": 2},
    )
    assert invoke("train", str(experiment)).exit_code == 0
    run = RunDir(tmp_path / "runs" / "tiny")
    events = [e for e in run.read_events() if "eval_accuracy" in e]
    # The first evaluation with the highest accuracy is the best (a later tie does not replace it).
    best_step = max(events, key=lambda e: (e["eval_accuracy"], -e["step"]))["step"]
    kept = {run.checkpoint_step(p) for p in run.list_checkpoints()}
    assert kept == {44, 48, best_step}
    assert best_step < 44, "the task peaks early: the best checkpoint is kept besides the newest"
    best = json.loads(run.metrics_file.read_text())["train"]["best_checkpoint"]
    assert best == str(run.checkpoint_dir(best_step))


def published_checkpoints(run: RunDir, steps: list[int]) -> None:
    for step in steps:
        staging = checkpoint.staging_dir(run.checkpoint_dir(step))
        staging.mkdir(parents=True)
        (staging / checkpoint.LOOP_STATE_FILE).write_text("{}")
        (staging / "model.safetensors").write_bytes(bytes(range(256)))
        checkpoint.publish(staging, run.checkpoint_dir(step))


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_skips_damaged_checkpoints(tmp_path, caplog):
    run = RunDir(tmp_path)
    published_checkpoints(run, [2, 4])
    assert all(checkpoint.damage(path) is None for path in run.list_checkpoints())
    flip_a_byte(run.checkpoint_dir(4) / "model.safetensors")
    assert checkpoint.resume_point(run, None, "loop") == run.checkpoint_dir(2)
    assert "checkpoint-4 is damaged (model.safetensors differs from when it was saved)" in caplog.text
    with pytest.raises(FtcliError, match="checkpoint-4 is damaged"):
        checkpoint.resume_point(run, "4", "loop")
    (run.checkpoint_dir(2) / "model.safetensors").unlink()
    assert checkpoint.damage(run.checkpoint_dir(2)) == "model.safetensors is missing"
    with pytest.raises(FtcliError, match="every checkpoint of .* is damaged"):
        checkpoint.resume_point(run, None, "loop")


def test_manifests_of_earlier_versions_whole_file_sha256s_are_still_checked(tmp_path):
    run = RunDir(tmp_path)
    published_checkpoints(run, [2])
    folder = run.checkpoint_dir(2)
    legacy = {
        path.name: {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in folder.iterdir()
        if path.name != checkpoint.MANIFEST_FILE
    }
    (folder / checkpoint.MANIFEST_FILE).write_text(json.dumps(legacy))
    assert checkpoint.damage(folder) is None
    flip_a_byte(folder / "model.safetensors")
    assert checkpoint.damage(folder) == "model.safetensors differs from when it was saved"


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_damaged_checkpoint_is_passed_over_on_resume(backend, make_experiment, tmp_path):
    experiment = make_experiment(
        backend=backend, train_size=64, training={"max_steps": 4, "eval_every": 2, "save_every": 2}
    )
    assert invoke("train", str(experiment)).exit_code == 0
    run = RunDir(tmp_path / "runs" / "tiny")
    assert [p.name for p in run.list_checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert all(checkpoint.damage(path) is None for path in run.list_checkpoints())
    flip_a_byte(run.checkpoint_dir(4) / "model.safetensors")

    resumed = invoke("train", str(experiment), "--resume")
    assert resumed.exit_code == 0, resumed.output
    train_metrics = json.loads(run.metrics_file.read_text())["train"]
    assert train_metrics["resumed_from"] == str(run.checkpoint_dir(2)) and train_metrics["global_step"] == 4
    assert checkpoint.damage(run.checkpoint_dir(4)) is None  # written again


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_full_disk_while_saving_is_a_user_error(backend, make_experiment, tmp_path, monkeypatch):
    experiment = make_experiment(
        backend=backend, train_size=64, training={"max_steps": 6, "eval_every": 2, "save_every": 2}
    )
    save = torch.save

    def disk_fills_at_step_4(obj, path, *args, **kwargs):  # both backends save the optimizer with torch.save
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    result = invoke("train", str(experiment))
    assert result.exit_code == 2, result.output
    assert "no space left on device while saving checkpoint-4; checkpoint-2 is intact" in result.output
    assert "--resume" in result.output
    run = RunDir(tmp_path / "runs" / "tiny")
    assert [p.name for p in run.list_checkpoints()] == ["checkpoint-2"]
    assert not checkpoint.staging_dir(run.checkpoint_dir(4)).exists() and not run.lock_file.exists()


def test_host_snapshots_are_copies_that_keep_tied_tensors_tied_and_reuse_their_memory():
    weight = torch.randn(4, 3)
    state = {"model": {"embed": weight, "decoder": weight, "bias": torch.zeros(3)}, "optimizer": {"step": torch.tensor(2.0)}}
    buffers = checkpointing.HostBuffers()
    before = weight.clone()
    first = buffers.copy(state)
    weight.add_(1.0)  # training goes on after the snapshot
    assert torch.equal(first["model"]["embed"], before)
    assert first["model"]["embed"] is first["model"]["decoder"]
    state["optimizer"]["step"] = torch.tensor(3.0)  # a new tensor of the same shape (a schedule's tensor learning rate)
    second = buffers.copy(state)
    assert second["model"]["embed"].data_ptr() == first["model"]["embed"].data_ptr()  # the same host memory again
    assert second["optimizer"]["step"].data_ptr() == first["optimizer"]["step"].data_ptr()
    assert torch.equal(second["model"]["embed"], weight)
    assert second["optimizer"]["step"].item() == 3.0


def test_the_last_checkpoint_is_published_when_train_returns_though_it_was_written_meanwhile(
    make_experiment, monkeypatch
):
    """The final save is written while the model is saved, scored and its curves drawn; train
    returns only once it is published."""
    analyzed = threading.Event()
    write = checkpointing.CheckpointWriter._write
    overlapped = []

    def analyze_then_signal(run):
        analysis = analyze_run(run)
        analyzed.set()
        return analysis

    def write_last_after_analysis(self, staging, final, *args):
        if final.name == "checkpoint-32":
            overlapped.append(analyzed.wait(timeout=60))
            time.sleep(0.2)
        write(self, staging, final, *args)

    monkeypatch.setattr(checkpointing.CheckpointWriter, "_write", write_last_after_analysis)
    experiment = make_experiment(backend="loop", training={"epochs": 2})
    run = train(load_config(experiment), analyze=analyze_then_signal).run

    assert overlapped == [True]
    checkpoints = run.list_checkpoints()
    assert [path.name for path in checkpoints] == ["checkpoint-16", "checkpoint-32"]
    assert all(checkpoint.damage(path) is None and (path / checkpoint.MANIFEST_FILE).is_file() for path in checkpoints)
    assert not (run.checkpoints / ".partial").exists()


def test_a_save_does_not_wait_for_the_previous_checkpoint_to_reach_the_disk_and_publishing_keeps_order(
    make_experiment, monkeypatch
):
    """Checkpoint-16's fsync and publishing are held until checkpoint-32 has been written out: the
    second save must not wait for the first's publishing, and the first is still published first."""
    publish = checkpoint.publish
    published, waited = [], []

    def publish_first_after_the_second_is_written(staging, final):
        if final.name == "checkpoint-16":
            second = checkpoint.staging_dir(final.with_name("checkpoint-32")) / checkpoint.LOOP_STATE_FILE
            deadline = time.monotonic() + 30
            while not second.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            waited.append(second.exists())
        publish(staging, final)
        published.append(final.name)

    monkeypatch.setattr(checkpointing, "publish", publish_first_after_the_second_is_written)
    experiment = make_experiment(backend="loop", training={"epochs": 2, "keep_checkpoints": 2})
    run = train(load_config(experiment)).run

    assert waited == [True]
    assert published == ["checkpoint-16", "checkpoint-32"]
    assert all(checkpoint.damage(path) is None for path in run.list_checkpoints())
    assert not (run.checkpoints / ".partial").exists()


def test_a_tensor_learning_rate_keeps_its_tensor_and_takes_the_saved_value(tmp_path):
    """A CUDA-graph run's learning rate is a tensor on the GPU that the captured step reads: after
    resuming, it must still be that tensor, or the graph trains at the rate it was captured with."""
    parameter = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([parameter], lr=torch.tensor(0.25))
    torch.save(saved.state_dict(), tmp_path / "optimizer.pt")
    rate = torch.tensor(1.0)
    optimizer = torch.optim.AdamW([parameter], lr=rate)
    checkpointing.load_optimizer_state(optimizer, torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert optimizer.param_groups[0]["lr"] is rate
    assert rate.item() == 0.25


def test_a_loop_checkpoints_optimizer_file_holds_only_the_optimizer_state(make_experiment):
    """optimizer.pt holds AdamW's two fp32 moments per trainable parameter and little else: the
    snapshot's host memory once carried the weights into it too (1.5 times the size)."""
    experiment = make_experiment(backend="loop", train_size=16, training={"max_steps": 2, "eval_every": 2, "save_every": 2})
    run = train(load_config(experiment)).run
    folder = run.checkpoint_dir(2)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = 2 * 4 * sum(p.numel() for p in trainable)
    allowance = 16_384 + 256 * len(trainable)  # the pickled structure, a step count per tensor, alignment
    assert moments < (folder / "optimizer.pt").stat().st_size <= moments + allowance


def test_a_tensor_learning_rates_schedule_file_holds_only_the_schedule(tiny_model_dir, tmp_path):
    """With a CUDA-graph run's tensor learning rate the schedule's state holds tensors too (its base
    and last rates): scheduler.pt must hold those few numbers, not the weights and moments beside
    them in the snapshot's host memory."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    run = RunDir(tmp_path)
    writer = checkpointing.CheckpointWriter(run, Accelerator(cpu=True), keep=1)
    writer.save(run.checkpoint_dir(1), model, AutoTokenizer.from_pretrained(tiny_model_dir), optimizer, scheduler, {}, None)
    writer.close()
    assert torch.is_tensor(torch.load(run.checkpoint_dir(1) / "scheduler.pt", weights_only=True)["_last_lr"][0])
    assert (run.checkpoint_dir(1) / "scheduler.pt").stat().st_size < 16_384
