"""ftcli sweep on a real PostgreSQL server shared by several workers: each trial runs once, a
worker killed mid-trial has its trial retried (its run resumed from its checkpoint), and the study
continues when the command runs again.

The server is the Debian package's (apt-get install postgresql; .ci/run installs it), started by
the fixture below on a free local port in a temporary folder and stopped at the end."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import invoke

from ftcli.launch import free_port

pytest.importorskip("psycopg", reason="pip install 'ftcli[postgres]' for psycopg")

QUICK = {"max_steps": 6, "eval_every": 2, "save_every": 2, "logging_steps": 2}
SPACE = {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server of its own for this test session; its URL without a database."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (no /usr/lib/postgresql/*/bin/initdb)")
    bin_dir = Path(initdb[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="ftcli-postgres-"))
    # initdb refuses to run as root: the server runs as the package's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    server = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log")]
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*server, "-o", options, "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*server, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def storage(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh database for one test, as ftcli sweep's --storage."""
    import psycopg

    name = "ftcli_" + "".join(c if c.isalnum() else "_" for c in request.node.name).lower()[:50]
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


def read_trials(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "trials.csv").open() as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_two_workers_share_three_trials_each_run_once_and_the_study_continues(make_experiment, storage, tmp_path):
    experiment = make_experiment(training=QUICK, sweep=SPACE)
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    result = invoke("sweep", str(experiment), "--trials", "3", "--storage", storage, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "3 run now" in result.output

    rows = read_trials(sweep_dir)
    assert [row["trial"] for row in rows] == ["0", "1", "2"] and {row["state"] for row in rows} == {"complete"}
    assert len({row["run_dir"] for row in rows}) == 3  # each trial once, in its own run
    for row in rows:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert float(row["accuracy"]) == metrics["validation"]["accuracy"]
    assert (sweep_dir / "best.yaml").is_file() and not (sweep_dir / "study.db").exists()

    import optuna

    study = optuna.load_study(study_name="tiny", storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    # Both workers trained trials. A worker that asked for a trial just as the other took the last
    # one finds it surplus: marked, failed and never trained (it has no worker), as run_trial says.
    trained = [trial for trial in study.trials if not trial.user_attrs.get("surplus")]
    assert {trial.user_attrs["worker"] for trial in trained} == {0, 1} and len(trained) == 3
    assert all(trial.state == optuna.trial.TrialState.FAIL for trial in study.trials if trial not in trained)

    # The new trial takes the study's next number: after a surplus trial (3) that is 4.
    continued = ["0", "1", "2", str(len(study.trials))]
    again = invoke("sweep", str(experiment), "--trials", "4", "--storage", storage)  # continued, one more
    assert again.exit_code == 0, again.output
    assert "1 run now" in again.output and [row["trial"] for row in read_trials(sweep_dir)] == continued


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_retried_and_its_run_resumed(make_experiment, storage, tmp_path):
    experiment = make_experiment(training=QUICK | {"max_steps": 40, "eval_every": 4, "save_every": 4}, sweep=SPACE)
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    command = ["sweep", str(experiment), "--trials", "2", "--storage", storage, "--heartbeat", "1", "--retry-failed", "1"]
    worker = subprocess.Popen([sys.executable, "-m", "ftcli", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_run = sweep_dir / "tiny-trial-0"
    deadline = time.monotonic() + 300
    while not list((killed_run / "checkpoints").glob("checkpoint-*")):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker ended before its first checkpoint"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)  # a machine taken away: no checkpoint saved on the way out
    worker.wait()
    assert not (killed_run / "model").exists()

    time.sleep(2.5)  # two heartbeats of silence: the next worker finds the trial stale
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    rows = read_trials(sweep_dir)
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "fail"), ("1", "complete"), ("2", "complete")]
    assert rows[1]["run_dir"] == str(killed_run) and rows[1]["training.learning_rate"] == rows[0]["training.learning_rate"]
    metrics = json.loads((killed_run / "metrics.json").read_text())["train"]
    assert "checkpoint-" in metrics["resumed_from"] and metrics["global_step"] == 40
    assert "again: resuming tiny-trial-0" in result.output
