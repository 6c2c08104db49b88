"""Several processes: 2 CPU processes (gloo) with batch 4 each train as one process with batch 8.
Both runs are on the CPU also where there is a GPU (CUDA_VISIBLE_DEVICES is empty for them).

Both see the same examples at every optimizer step (the same permutation, split between the
processes) and average the same gradients, so with dropout off every logged number agrees up to
the order of float sums (all-reduce versus one batch). Only the main process writes and prints.
Two machines (two launches on 127.0.0.1, one process each) train exactly as two processes of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from ftcli.launch import free_port


CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def launch_two_processes(backend: str, experiment, *overrides: str) -> subprocess.CompletedProcess:
    if backend == "loop":  # ftcli's own flag, which re-executes itself under accelerate launch
        return run_cli("train", str(experiment), *overrides, "--num-processes", "2", env=CPU_ONLY)
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"),
        *("--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"),
        *("-m", "ftcli", "train", str(experiment), *overrides),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **CPU_ONLY})


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
    backend, make_experiment, tiny_model_without_dropout_dir, tmp_path
):
    experiment = make_experiment(
        train_size=64,
        backend=backend,
        model=str(tiny_model_without_dropout_dir),
        training={"epochs": 2, "eval_every": 4, "save_every": 4},
    )
    single = run_cli("train", str(experiment), "--set", "name=one", env=CPU_ONLY)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = launch_two_processes(backend, experiment, "--set", "name=two", "--set", "training.batch_size=4")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("run directory:") == 1, "the second process printed too"

    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    events_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    events_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(events_two) == len(events_one)  # each event once: only the main process logs
    for expected, actual in zip(events_one, events_two):
        assert_close(expected, actual)

    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    assert_close(metrics_one["validation"], metrics_two["validation"])
    for key in ("global_step", "epoch", "train_samples"):
        assert metrics_two["train"][key] == metrics_one["train"][key], key
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
def test_two_machines_train_as_two_processes_of_one(make_experiment, tiny_model_without_dropout_dir, tmp_path):
    experiment = make_experiment(
        train_size=64,
        model=str(tiny_model_without_dropout_dir),
        training={"epochs": 2, "eval_every": 4, "save_every": 4, "batch_size": 4},
    )
    one_machine = launch_two_processes("loop", experiment, "--set", "name=one-machine")
    assert one_machine.returncode == 0, one_machine.stderr[-3000:]
    main, other = launch_as_two_machines(experiment, "--set", "name=two-machines")
    assert main.returncode == 0, main.stderr[-3000:]
    assert other.returncode == 0, other.stderr[-3000:]
    assert main.stdout.count("run directory:") == 1 and "run directory:" not in other.stdout  # only rank 0 prints

    one, two = tmp_path / "runs" / "one-machine", tmp_path / "runs" / "two-machines"
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
