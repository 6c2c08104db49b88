"""The run directory's lock: one `ftcli train` at a time writes a run; a lock left by a dead process is taken over."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
from conftest import invoke

from ftcli.errors import FtcliError
from ftcli.rundir import RunDir


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
