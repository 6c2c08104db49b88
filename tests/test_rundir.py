"""The run directory's lock: one `ftcli train` at a time writes a run; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import invoke

from ftcli.runs import checkpoints as checkpoint
from ftcli.errors import FtcliError
from ftcli.runs.rundir import RunDir


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_held_while_inside_and_refuses_a_second_writer(tmp_path):
    run = RunDir.create(tmp_path / "run")
    with run.lock():
        assert run.lock_file.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(FtcliError, match=f"in use by process {os.getpid()}"):
            with run.lock():
                pass
        (run.config_file).write_text("name: run\n")
        with pytest.raises(FtcliError, match="in use"):  # --overwrite must not delete a run in progress
            RunDir.create(run.path, overwrite=True)
    assert not run.lock_file.exists()


@pytest.fixture
def finished_run(make_experiment, tmp_path):
    experiment = make_experiment(backend="loop", training={"max_steps": 2, "eval_every": 2, "save_every": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    return experiment, RunDir(tmp_path / "runs" / "tiny")


def test_train_refuses_a_run_another_process_trains(finished_run):
    experiment, run = finished_run
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.lock_file.write_text(f"{other.pid} {socket.gethostname()}\n")
        result = invoke("train", str(experiment), "--resume")
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 2
    assert f"run directory {run.path} is in use by process {other.pid}" in result.output
    assert run.lock_file.read_text().split()[0] == str(other.pid)  # the other process's lock is left alone


def test_train_takes_over_the_lock_of_a_dead_process(finished_run, caplog):
    experiment, run = finished_run
    run.lock_file.write_text(f"{dead_pid()} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        result = invoke("train", str(experiment), "--resume")
    assert result.exit_code == 0, result.output
    assert any("taking over the lock" in record.getMessage() for record in caplog.records)
    assert not run.lock_file.exists()


# `ftcli ARGS...` once its imports are done and the file argv[1] exists: two such processes start
# their commands at the same moment, whatever their import times.
START_TOGETHER = """
import os, sys, time
from pathlib import Path
import ftcli.cli, ftcli.commands.train, ftcli.training.loop, ftcli.training.trainer
go = Path(sys.argv[1])
Path(f"{go}.ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
sys.argv = ["ftcli", *sys.argv[2:]]
ftcli.cli.main()
"""


@pytest.mark.slow
def test_two_overwrites_started_together_one_wins_and_its_run_is_intact(make_experiment, tmp_path):
    """Both used to delete the finished run at once; one then crashed (FileNotFoundError on
    training_state.json, optimizer.pt or metrics.json). The lock is now taken before anything is
    deleted: the second is refused, and the first's run is whole."""
    experiment = make_experiment(training={"epochs": None, "max_steps": 60, "eval_every": 20, "save_every": 20})
    assert invoke("train", str(experiment)).exit_code == 0
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", START_TOGETHER, str(go), "train", str(experiment), "--overwrite"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    ready = [tmp_path / f"go.ready.{process.pid}" for process in processes]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in ready):
        assert time.monotonic() < deadline and all(process.poll() is None for process in processes)
        time.sleep(0.01)
    go.touch()  # imports done in both: they reach the run directory within milliseconds of each other
    results = [(process.wait(timeout=600), process.stderr.read()) for process in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "is in use by process" in loser and "Traceback" not in loser, loser
    run = RunDir(tmp_path / "runs" / "tiny")
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["train"]["global_step"] == 60 and "validation" in metrics
    assert (run.model_dir / "model.safetensors").is_file() and not run.lock_file.exists()
    checkpoints = run.list_checkpoints()
    assert [run.checkpoint_step(path) for path in checkpoints][-2:] == [40, 60]
    assert all(checkpoint.damage(path) is None for path in checkpoints)


def test_a_failed_start_leaves_no_directory_and_an_old_run_untouched(make_experiment, tmp_path):
    experiment = make_experiment(training={"max_steps": 2, "eval_every": 2, "save_every": 2})
    bad = invoke("train", str(experiment), "--set", "data.label_field=nope")
    assert bad.exit_code == 2 and not (tmp_path / "runs" / "tiny").exists()
    assert invoke("train", str(experiment)).exit_code == 0
    run = RunDir(tmp_path / "runs" / "tiny")
    before = {path: path.stat().st_mtime_ns for path in run.path.rglob("*")}
    again = invoke("train", str(experiment), "--overwrite", "--set", "data.label_field=nope")
    assert again.exit_code == 2 and "has no column 'nope'" in again.output
    assert {path: path.stat().st_mtime_ns for path in run.path.rglob("*")} == before
