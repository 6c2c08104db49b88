"""Exact resume, both backends: a run killed with SIGKILL after a checkpoint (once, or five times at
random moments), or stopped by SIGTERM, then resumed, ends with the same weights (bit for bit, on the
CPU) and the same metrics as a run never interrupted."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import invoke, write_experiment
from safetensors.torch import load_file

from ftcli.runs.rundir import RunDir

STEPS_PER_EPOCH = 64 // 8
# The interrupted runs are processes of their own, killed (or stopped) wherever they are; they fork
# from a server that imported once what a training imports (torch, transformers, ftcli, both
# backends, and what training imports late: the metrics' sklearn, the figures' matplotlib), rather
# than each spending ~7 s of CPU on the imports (ten starts in this file).
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload([
    "torch", "transformers", "ftcli.cli", "ftcli.commands.train", "ftcli.training.loop", "ftcli.training.trainer",
    "ftcli.reporting.report", "sklearn.metrics", "transformers.optimization", "transformers.models.bert.modeling_bert",
])
# What `python -m ftcli ARGS` runs, with stdout dropped and stderr into a file; one intra-op thread,
# as in the runs it is compared with (one_thread), hence the same float reductions.
START = """
import os, sys, torch
torch.set_num_threads(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
os.dup2(os.open({stderr!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
sys.argv = ["ftcli", *{argv!r}]
from ftcli.cli import main
main()
"""


def start_ftcli(*argv: str, stderr: Path = Path(os.devnull)) -> multiprocessing.Process:
    """`ftcli ARGS` in a process of its own (see FORK_SERVER)."""
    process = FORK_SERVER.Process(target=exec, args=(START.format(argv=list(argv), stderr=str(stderr)),))
    process.start()
    return process


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    """experiment(backend, precision): the experiment of 2 epochs, saving every 2 steps, whose
    uninterrupted run (runs/straight) is trained once per backend and precision for the tests that
    interrupt it; returns (experiment, runs folder)."""
    trained: dict[tuple[str, str], tuple[Path, Path]] = {}

    def experiment(backend: str, precision: str = "fp32") -> tuple[Path, Path]:
        if (backend, precision) not in trained:
            folder = tmp_path_factory.mktemp(f"resume-{backend}-{precision}")
            training = {
                "epochs": 2, "eval_every": 2, "save_every": 2, "logging_steps": 2, "keep_checkpoints": 2, "precision": precision
            }
            path = write_experiment(folder, tiny_model_dir, train_size=64, backend=backend, training=training)
            train_straight(path)  # inside a test that holds one_thread, as the interrupted runs (START)
            trained[backend, precision] = path, folder / "runs"
        return trained[backend, precision]

    return experiment


def train_until_killed(experiment, run, after_step: int = 0) -> None:
    """Start `ftcli train` and kill -9 it as soon as a checkpoint past after_step exists (mid-epoch)."""
    process = start_ftcli("train", str(experiment), "--set", f"name={run.name}")
    deadline = time.monotonic() + 300
    while not [path for path in (run / "checkpoints").glob("checkpoint-*") if int(path.name.split("-")[1]) > after_step]:
        assert process.is_alive(), "training ended before a checkpoint appeared"
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.01)
    process.kill()
    process.join()
    assert not (run / "model").exists(), "the run finished before it was killed"


def train_straight(experiment) -> None:
    """The uninterrupted run every resumed one is compared with, as runs/straight."""
    straight = invoke("train", str(experiment), "--set", "name=straight")
    assert straight.exit_code == 0, straight.output


def assert_same_weights_as_straight(runs, run) -> None:
    expected = load_file(runs / "straight" / "model" / "model.safetensors")
    weights = load_file(run / "model" / "model.safetensors")
    assert expected.keys() == weights.keys()
    assert all(torch.equal(expected[name], weights[name]) for name in expected)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "precision", "after_step"),
    [("loop", "fp32", 0), ("trainer", "fp32", 0), ("loop", "bf16", 0), ("trainer", "fp32", STEPS_PER_EPOCH)],
    ids=["loop", "trainer", "loop-bf16", "trainer-second-epoch"],
)
def test_killed_run_resumes_exactly(backend, precision, after_step, straight_run, one_thread):
    experiment, runs = straight_run(backend, precision)
    killed = runs / f"killed-after-{after_step}"
    train_until_killed(experiment, killed, after_step)
    resumed = invoke("train", str(experiment), "--set", f"name={killed.name}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights_as_straight(runs, killed)

    expected_metrics = json.loads((runs / "straight" / "metrics.json").read_text())
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["validation"] == expected_metrics["validation"]
    for key in ("global_step", "epoch", "train_samples", "best_score", "stopped_early"):
        assert metrics["train"][key] == expected_metrics["train"][key], key
    resumed_step = int(metrics["train"]["resumed_from"].rsplit("-", 1)[1])
    assert resumed_step % STEPS_PER_EPOCH, "the kill was meant to land mid-epoch"

    # The events the killed run logged after its checkpoint were dropped and logged again.
    expected_events = (runs / "straight" / "metrics.jsonl").read_text().splitlines()
    assert (killed / "metrics.jsonl").read_text().splitlines() == expected_events


def test_resume_refuses_a_changed_config_and_a_finished_run_stays_finished(make_experiment, tmp_path):
    experiment = make_experiment(backend="loop", training={"max_steps": 4, "eval_every": 2, "save_every": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    events = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text()
    again = invoke("train", str(experiment), "--resume")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text() == events  # no step taken, none logged
    assert json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["train"]["global_step"] == 4

    changed = invoke("train", str(experiment), "--resume", "--set", "training.learning_rate=1e-3")
    assert changed.exit_code == 2
    assert "training.learning_rate" in changed.output and "--resume" in changed.output
    missing = invoke("train", str(experiment), "--resume-from", "checkpoint-99")
    assert missing.exit_code == 2 and "checkpoint-4" in missing.output
    assert invoke("train", str(experiment), "--resume", "--overwrite").exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(backend, straight_run, one_thread):
    experiment, runs = straight_run(backend)

    log = runs.parent / "stopped.stderr"
    process = start_ftcli("train", str(experiment), "--set", "name=stopped", stderr=log)
    deadline = time.monotonic() + 300
    while not any((runs / "stopped" / "checkpoints").glob("checkpoint-*")):
        assert process.is_alive() and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    process.join(timeout=120)
    stderr = log.read_text()
    assert process.exitcode == 143, stderr
    stopped_step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert f"checkpoint-{stopped_step} saved; continue with ftcli train" in stderr and "--resume" in stderr
    newest = sorted((runs / "stopped" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest[-1].name == f"checkpoint-{stopped_step}"
    assert not (runs / "stopped" / "model").exists() and not (runs / "stopped" / ".lock").exists()

    resumed = invoke("train", str(experiment), "--set", "name=stopped", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((runs / "stopped" / "metrics.json").read_text())["train"]["resumed_from"].endswith(
        f"checkpoint-{stopped_step}"
    )
    assert_same_weights_as_straight(runs, runs / "stopped")


@pytest.mark.slow
def test_five_kills_at_random_points_still_resume_exactly(make_experiment, tmp_path, one_thread):
    """SIGKILL wherever it lands (mid-step, mid-save, mid-evaluation), five times in a row."""
    # 128 steps: room for five starts that each save a checkpoint and then run on for up to 0.1 s
    # (a few steps here: these steps take ~20 ms, with an evaluation and a save every 2 steps).
    experiment = make_experiment(
        train_size=64,
        backend="loop",
        training={"epochs": 16, "eval_every": 2, "save_every": 2, "logging_steps": 2, "keep_checkpoints": 2},
    )
    runs = tmp_path / "runs"
    train_straight(experiment)

    rng = random.Random(0)
    run = RunDir(runs / "killed")
    newest = 0  # the step the next start resumes from
    for kill in range(5):
        args = ["--resume"] if kill else []
        process = start_ftcli("train", str(experiment), "--set", "name=killed", *args)
        # Once this start has saved a checkpoint of its own, kill it a random moment later.
        while process.is_alive() and not [p for p in run.list_checkpoints() if run.checkpoint_step(p) > newest]:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.1))
        process.kill()
        process.join()
        assert not run.model_dir.exists(), "the run finished before it was killed"
        newest = max(map(run.checkpoint_step, run.list_checkpoints()))

    resumed = invoke("train", str(experiment), "--set", "name=killed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights_as_straight(runs, run.path)


@pytest.mark.parametrize("backend", ["trainer", "loop"])
def test_resume_from_any_checkpoint_is_exact(backend, make_experiment, tmp_path, one_thread):
    """Warm-up, and evaluation and a save on the same steps, resumed from checkpoints in several
    epochs: the evaluations, the best checkpoint and the final weights are the uninterrupted run's.
    (The trainer backend used to draw each epoch's order from torch's global generator, which a
    resumed run had not restored yet: every resume after the first epoch trained in another order.)"""
    experiment = make_experiment(
        train_size=128,
        pair=True,
        backend=backend,
        training={
            "epochs": None, "max_steps": 80, "warmup_ratio": 0.1, "eval_every": 10, "save_every": 10,
            "logging_steps": 5, "keep_checkpoints": 10, "learning_rate": 5e-4,
        },
    )
    runs = tmp_path / "runs"
    train_straight(experiment)
    for step in (10, 30, 50, 70):  # 16 steps an epoch: in the first, second, fourth and fifth
        name = f"from-{step}"
        shutil.copytree(runs / "straight", runs / name)
        config = runs / name / "config.yaml"
        config.write_text(config.read_text().replace("name: straight", f"name: {name}"))
        resumed = invoke("train", str(experiment), "--set", f"name={name}", "--resume-from", f"checkpoint-{step}")
        assert resumed.exit_code == 0, resumed.output
        assert (runs / name / "metrics.jsonl").read_text() == (runs / "straight" / "metrics.jsonl").read_text(), step
        metrics = json.loads((runs / name / "metrics.json").read_text())
        expected = json.loads((runs / "straight" / "metrics.json").read_text())
        assert metrics["validation"] == expected["validation"]
        assert Path(metrics["train"]["best_checkpoint"]).name == Path(expected["train"]["best_checkpoint"]).name
        assert_same_weights_as_straight(runs, runs / name)
