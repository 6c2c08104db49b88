"""Mixed precision on the CPU: auto is bf16 where the CPU computes bf16 natively, and a bf16 run
trains, evaluates and predicts under bf16 autocast with either backend."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke

from ftcli import runtime
from ftcli.runtime import Runtime, autocast_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)],
)
def test_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(runtime, "cpu_bf16_gain", lambda: 1.6)
    assert autocast_dtype("auto", CPU) is expected


def test_auto_measures_bf16_once_per_machine_and_keeps_fp32_where_it_gains_little(monkeypatch, tmp_path):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path))  # nothing measured yet
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    measured = []
    gains = iter([1.1])
    monkeypatch.setattr(runtime, "measure_bf16_gain", lambda: measured.append(1) or next(gains))
    dtype, reason = runtime.resolve_precision("auto", CPU)
    assert dtype is None and "1.10x" in reason and "fp32" in reason
    assert runtime.resolve_precision("auto", CPU) == (dtype, reason) and len(measured) == 1  # cached
    cache = json.loads((tmp_path / runtime.PRECISION_CACHE).read_text())
    assert list(cache.values()) == [1.1] and "threads" in next(iter(cache))
    assert runtime.BF16_MIN_GAIN > 1.1


def test_the_measurement_times_both_precisions_and_leaves_the_rng_alone():
    before = torch.random.get_rng_state()
    gain = runtime.measure_bf16_gain(repeats=1)
    assert 0.05 < gain < 20  # a ratio of two real timings
    assert torch.equal(torch.random.get_rng_state(), before)  # a run's seeded draws come out the same


def test_env_json_says_why_auto_chose(monkeypatch, make_experiment, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(runtime, "cpu_bf16_gain", lambda: 2.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    experiment = make_experiment(training={"precision": "auto", "epochs": 1})
    assert invoke("train", str(experiment)).exit_code == 0
    env = json.loads((tmp_path / "runs" / "tiny" / "env.json").read_text())
    assert env["precision"] == "bf16" and "2.00x" in env["precision_reason"]


def test_an_explicit_precision_is_kept_on_the_cpu_except_fp16():
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("fp16", CPU) is None  # a GPU config still runs on a laptop, in fp32


@pytest.fixture
def logits_dtypes():
    """The dtype of every classification head's output, by whether gradients were on (training)
    or off (evaluation, predict). Under bf16 autocast a Linear layer computes and returns bf16."""
    seen: dict[str, set[torch.dtype]] = {"train": set(), "inference": set()}

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.out_features == 2:
            seen["train" if torch.is_grad_enabled() else "inference"].add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_bf16_run_trains_evaluates_and_predicts_in_bf16(backend, make_experiment, tmp_path, logits_dtypes):
    experiment = make_experiment(train_size=32, eval_size=16, backend=backend, training={"epochs": 1, "precision": "bf16"})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    assert f"on {Runtime.resolve().device.type} in bf16" in result.output
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "env.json").read_text())["precision"] == "bf16"
    assert logits_dtypes == {"train": {torch.bfloat16}, "inference": {torch.bfloat16}}

    logits_dtypes["inference"].clear()
    predicted = invoke("predict", str(run), "--text", "the film was great")
    assert predicted.exit_code == 0, predicted.output
    assert logits_dtypes["inference"] == {torch.bfloat16}


def test_an_fp32_run_stays_in_fp32(make_experiment, tmp_path, logits_dtypes):
    experiment = make_experiment(train_size=32, eval_size=16, training={"epochs": 1, "precision": "fp32"})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "runs" / "tiny" / "env.json").read_text())["precision"] == "fp32"
    assert logits_dtypes == {"train": {torch.float32}, "inference": {torch.float32}}
