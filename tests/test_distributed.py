"""Several processes: 2 CPU processes (gloo) with batch 4 each train as one process with batch 8.
Both runs are on the CPU also where there is a GPU (CUDA_VISIBLE_DEVICES is empty for them).

Both see the same examples at every optimizer step (the same permutation, split between the
processes) and average the same gradients, so with dropout off every logged number agrees up to
the order of float sums (all-reduce versus one batch). Only the main process writes and prints.
Two machines (two launches on 127.0.0.1, one process each) train exactly as two processes of one.
The trainer backend is launched with configs/accelerate/ddp.yaml: that file launches ftcli too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from conftest import invoke, run_cli, write_experiment
from safetensors.torch import load_file

from ftcli.launch import free_port

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
DDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
TRAINING = {"epochs": 2, "eval_every": 4, "save_every": 4}


def launch_two_processes(backend: str, experiment, *overrides: str) -> subprocess.CompletedProcess:
    if backend == "loop":  # ftcli's own flag, which re-executes itself under accelerate launch
        return run_cli("train", str(experiment), *overrides, "--num-processes", "2", env=CPU_ONLY)
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG)),
        *(f"--main_process_port={free_port()}", "-m", "ftcli", "train", str(experiment), *overrides),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **CPU_ONLY})


def train_on_one_cpu_process(experiment, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-process run, in this process (no subprocess's imports), on the CPU as the launched
    processes are also where there is a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    single = invoke("train", str(experiment), "--set", f"name={name}")
    assert single.exit_code == 0, single.output


@pytest.fixture(scope="module")
def loop_on_two_processes(tmp_path_factory, tiny_model_without_dropout_dir) -> tuple[Path, Path]:
    """The loop backend on two processes of batch 4 (the experiment says 8), shared by the tests
    that compare it with one process and with two machines: (experiment, run directory)."""
    folder = tmp_path_factory.mktemp("distributed-loop")
    experiment = write_experiment(
        folder, tiny_model_without_dropout_dir, train_size=64, backend="loop", training=TRAINING
    )
    launched = launch_two_processes("loop", experiment, "--set", "name=two", "--set", "training.batch_size=4")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("run directory:") == 1, "the second process printed too"
    return experiment, folder / "runs" / "two"


def assert_close(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert actual[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        else:
            assert actual[key] == value, key


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_two_processes_train_as_one_with_the_same_global_batch(
    backend, loop_on_two_processes, tiny_model_without_dropout_dir, tmp_path, monkeypatch
):
    if backend == "loop":
        experiment, two = loop_on_two_processes
    else:
        experiment = write_experiment(
            tmp_path, tiny_model_without_dropout_dir, train_size=64, backend=backend, training=TRAINING
        )
        launched = launch_two_processes(backend, experiment, "--set", "name=two", "--set", "training.batch_size=4")
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert launched.stdout.count("run directory:") == 1, "the second process printed too"
        two = tmp_path / "runs" / "two"
    train_on_one_cpu_process(experiment, "one", monkeypatch)
    one = two.parent / "one"

    events_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    events_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(events_two) == len(events_one)  # each event once: only the main process logs
    for expected, actual in zip(events_one, events_two):
        assert_close(expected, actual)

    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    assert_close(metrics_one["validation"], metrics_two["validation"])
    # Tokens and model FLOPs summed over both processes (the fixture's texts are all as long: the same padding).
    for key in ("global_step", "epoch", "train_samples", "real_tokens", "padded_tokens", "model_flops"):
        assert metrics_two["train"][key] == metrics_one["train"][key], key
    assert metrics_two["train"]["train_samples"] == 2 * 64  # two processes of 4 examples a step, 2 epochs
    assert [p.name for p in (two / "checkpoints").iterdir()] == [p.name for p in (one / "checkpoints").iterdir()]


def launch_as_two_machines(experiment, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Two "machines" on 127.0.0.1: the same command twice, machine ranks 0 and 1, one process each."""
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "ftcli", "train", str(experiment), *overrides, "--num-processes", "1"),
                *("--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1"),
                *("--main-process-port", port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **CPU_ONLY},
        )
        for rank in (0, 1)
    ]
    finished = []
    for process in launches:
        stdout, stderr = process.communicate(timeout=600)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return finished


@pytest.mark.slow
def test_two_machines_train_as_two_processes_of_one(loop_on_two_processes):
    experiment, one = loop_on_two_processes
    main, other = launch_as_two_machines(experiment, "--set", "name=two-machines", "--set", "training.batch_size=4")
    assert main.returncode == 0, main.stderr[-3000:]
    assert other.returncode == 0, other.stderr[-3000:]
    assert main.stdout.count("run directory:") == 1 and "run directory:" not in other.stdout  # only rank 0 prints

    two = one.parent / "two-machines"
    # The same ranks, the same all-reduces: the same numbers, bit for bit.
    assert (two / "metrics.jsonl").read_text() == (one / "metrics.jsonl").read_text()
    metrics_one, metrics_two = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert metrics_two["validation"] == metrics_one["validation"]
    for key in ("global_step", "epoch", "train_samples", "best_score"):
        assert metrics_two["train"][key] == metrics_one["train"][key], key
    weights_one, weights_two = (load_file(run / "model" / "model.safetensors") for run in (one, two))
    assert weights_one.keys() == weights_two.keys()
    assert all(torch.equal(weights_one[name], weights_two[name]) for name in weights_one)
    assert [p.name for p in (two / "checkpoints").iterdir()] == [p.name for p in (one / "checkpoints").iterdir()]
