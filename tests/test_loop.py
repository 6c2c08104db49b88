"""Backend `loop` end to end through the CLI, its batch plan, and gradient accumulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import invoke
from datasets import Dataset
from safetensors.torch import load_file

import ftcli.training.loop
import ftcli.training.loop.setup
from ftcli.training.loop.plan import BatchPlan
from ftcli.training.loop.setup import family_why_eager, why_eager
from ftcli.config import TrainingConfig
from ftcli.training.loop.graphs import CaptureFailed, GraphedTrainStep
from ftcli.data.batching import DeviceTensors


def test_loop_backend_writes_the_trainer_backends_run_directory_and_learns(make_experiment, tmp_path):
    experiment = make_experiment(backend="loop", training={"epochs": 3})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"

    for name in ("config.yaml", "env.json", "metrics.jsonl", "metrics.json", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-32", "checkpoint-48"]  # keep_checkpoints=2
    for checkpoint in checkpoints:
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "training_state.json"):
            assert (checkpoint / name).is_file(), name
    assert not list(run.rglob("*.bin")) and not list(run.rglob("pytorch_model*"))

    # The same metrics.jsonl keys as the Trainer backend, and a falling loss.
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "train_loss" in e]
    eval_events = [e for e in events if "eval_loss" in e]
    assert all(set(e) == {"step", "epoch", "train_loss", "learning_rate", "grad_norm"} for e in train_events)
    assert all(set(e) == {"step", "epoch", "eval_loss", "eval_accuracy", "eval_f1"} for e in eval_events)
    assert [e["step"] for e in train_events] == list(range(2, 49, 2))
    assert [(e["step"], e["epoch"]) for e in eval_events] == [(16, 1.0), (32, 2.0), (48, 3.0)]
    assert np.mean([e["train_loss"] for e in train_events[-4:]]) < 0.5 * train_events[0]["train_loss"]
    assert train_events[-1]["learning_rate"] == 0.0  # linear decay to zero at the last step

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["kernels"] == {
        "step": "eager", "why": "cpu", "fused": [], "not_fused": "eager steps: the fused kernels run only inside a CUDA graph step",
    }
    assert metrics["validation"]["accuracy"] >= 0.75
    assert metrics["train"]["global_step"] == 48 and metrics["train"]["train_samples"] == 3 * 128
    best = metrics["train"]["best_checkpoint"]
    best_weights = load_file(f"{best}/model.safetensors")
    kept = load_file(run / "model" / "model.safetensors")
    # The kept model is the best checkpoint's, its output layer divided by the calibrating temperature.
    temperature = json.loads((run / "model" / "calibration.json").read_text())["temperature"]
    body = [name for name in kept if not name.startswith("classifier.")]
    assert all(torch.equal(best_weights[name], kept[name]) for name in body)
    assert all(torch.allclose(best_weights[name] / temperature, kept[name]) for name in ("classifier.weight", "classifier.bias"))

    # evaluate and predict read a loop run as they read a Trainer run.
    assert invoke("evaluate", str(run)).exit_code == 0
    evaluated = json.loads((run / "eval_validation.json").read_text())
    assert abs(evaluated["accuracy"] - metrics["validation"]["accuracy"]) < 1e-9
    assert invoke("evaluate", str(run), "--checkpoint", "48").exit_code == 0
    predicted = invoke("predict", str(run), "--text", "the film was great")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout.strip().splitlines()[-1])["predicted_label"] in ("negative", "positive")


@pytest.mark.parametrize("train_size", [64, 40])  # 40: the epoch ends with a shorter step
def test_accumulating_two_batches_of_8_updates_as_one_batch_of_16(
    train_size, make_experiment, tiny_model_without_dropout_dir, tmp_path
):
    def final_weights(name: str, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
        experiment = make_experiment(
            train_size=train_size,
            backend="loop",
            model=str(tiny_model_without_dropout_dir),
            training={"epochs": 2, "batch_size": batch_size, "grad_accum": grad_accum, "eval_every": "epoch"},
        )
        result = invoke("train", str(experiment), "--set", f"name={name}")
        assert result.exit_code == 0, result.output
        run = tmp_path / "runs" / name
        steps = json.loads((run / "metrics.json").read_text())["train"]["global_step"]
        assert steps == 2 * -(-train_size // 16)  # every epoch ends with a step, and no extra one
        return load_file(run / "checkpoints" / f"checkpoint-{steps}" / "model.safetensors")

    accumulated = final_weights("accumulated", batch_size=8, grad_accum=2)
    large_batch = final_weights("large-batch", batch_size=16, grad_accum=1)
    # Equal up to float rounding, which Adam's first steps (about lr × sign of the gradient) amplify
    # for near-zero gradients: a few 1e-6 on weights of size 0.1.
    for name, weight in large_batch.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-4, atol=1e-5)


def test_batch_plan_visits_every_example_once_per_epoch_in_a_seeded_order():
    plan = BatchPlan(num_examples=37, global_batch_size=8, grad_accum=2, seed=3, num_processes=1)
    batches = plan.epoch_batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(37))
    assert [len(batch) for batch in batches] == [8, 8, 8, 8, 5]
    # Resumable: the plan is a function of (seed, epoch) alone.
    assert all(np.array_equal(a, b) for a, b in zip(batches, plan.epoch_batches(0)))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(plan.epoch_batches(1)))
    assert plan.steps_per_epoch == 3
    assert [plan.step_examples(batches, index) for index in range(5)] == [16, 16, 16, 16, 5]

    # Two processes need an example each: a tail of one joins the batch before it.
    shared = BatchPlan(num_examples=33, global_batch_size=8, grad_accum=1, seed=3, num_processes=2)
    assert [len(batch) for batch in shared.epoch_batches(0)] == [8, 8, 8, 9]
    last = shared.epoch_batches(0)[-1]
    assert [len(shared.share(last, rank)) for rank in range(2)] == [5, 4]
    assert np.array_equal(np.concatenate([shared.share(last, rank) for rank in range(2)]), last)


def test_cuda_graphs_only_where_they_can_work_else_the_same_config_trains_eagerly_and_says_why(monkeypatch):
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    small = Dataset.from_dict({"length": [12, 40, 7]})
    for setting in ("cuda_graphs", "auto"):
        assert why_eager(TrainingConfig(compile=setting), small, gpu) == ""
        assert why_eager(TrainingConfig(compile=setting), small, cpu) == "cpu"
        assert why_eager(TrainingConfig(compile=setting, grad_accum=2), small, gpu) == "training.grad_accum: 2 (CUDA graphs: 1)"
        assert why_eager(TrainingConfig(compile=setting, optimizer="adamw_8bit"), small, gpu) == (
            "training.optimizer: adamw_8bit (CUDA graphs: adamw)"
        )
    assert TrainingConfig().compile == "auto"
    assert why_eager(TrainingConfig(compile="none"), small, gpu) == "training.compile: none"
    # auto leaves a training set that would crowd the GPU, or that the config keeps off it, to eager steps.
    assert why_eager(TrainingConfig(data_on_device=False), small, gpu) == "auto: training.data_on_device: false"
    monkeypatch.setattr(ftcli.training.loop.setup, "DEVICE_DATA_LIMIT_BYTES", DeviceTensors.nbytes_for(small))
    assert why_eager(TrainingConfig(), small, gpu) == "auto: the training set is too large to keep on the GPU"
    assert why_eager(TrainingConfig(compile="cuda_graphs"), small, gpu) == ""


def test_a_model_with_flash_attention_is_not_captured(tiny_model_dir):
    """flash-attn's varlen path reads each batch's lengths on the host (ModernBERT's unpadded path):
    no capture is tried, and the reason is said."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert family_why_eager(model) == ""
    model.config._attn_implementation_internal = "flash_attention_2"  # as loaded on a GPU with flash-attn
    assert family_why_eager(model).startswith("flash_attention_2 unpads each batch")


def test_warmup_then_the_configured_schedule(make_experiment, tmp_path):
    experiment = make_experiment(
        backend="loop",
        training={"max_steps": 8, "warmup_ratio": 0.25, "scheduler": "cosine", "logging_steps": 1}
        | {"eval_every": 8, "save_every": 8},
    )
    assert invoke("train", str(experiment)).exit_code == 0
    events = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    rates = [e["learning_rate"] for e in events if "learning_rate" in e]  # each logged after its step
    assert rates[:2] == pytest.approx([2.5e-3, 5e-3])  # 2 warm-up steps up to the peak
    assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:])) and rates[-1] == 0.0


def test_early_stopping_ends_at_the_first_evaluation_without_improvement(make_experiment, tmp_path):
    experiment = make_experiment(
        backend="loop",
        metrics=["accuracy"],
        training={"epochs": 3, "eval_every": 4, "save_every": 4, "early_stopping_patience": 1},
    )
    assert invoke("train", str(experiment)).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [(e["step"], e["eval_accuracy"]) for e in events if "eval_accuracy" in e]
    stop_step = scores[-1][0]
    assert scores[-1][1] <= max(score for _, score in scores[:-1])  # the last evaluation did not improve
    assert all(later > earlier for (_, earlier), (_, later) in zip(scores[:-2], scores[1:-1]))  # every earlier one did
    train = json.loads((run / "metrics.json").read_text())["train"]
    assert train["stopped_early"] and train["global_step"] == stop_step < 48
    assert (run / "checkpoints" / f"checkpoint-{stop_step}").is_dir()


@pytest.fixture
def uncapturable_step(monkeypatch):
    """As on a GPU where the model's step cannot be captured: the graphed path is taken, its
    capture fails (CI has no GPU, so the failure is simulated where capture would start)."""

    def capture(self, warmup_steps: int = 2) -> None:
        raise CaptureFailed("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(ftcli.training.loop, "why_eager", lambda training, train_set, device: "" if training.compile != "none" else "none")
    monkeypatch.setattr(GraphedTrainStep, "capture", capture)


def test_compile_auto_trains_eagerly_when_the_step_cannot_be_captured(make_experiment, tmp_path, caplog, uncapturable_step):
    # bf16, so that the eager run must put back the autocast that the graphed attempt left to its graphs.
    experiment = make_experiment(backend="loop", training={"epochs": 1, "precision": "bf16"})
    assert invoke("train", str(experiment), "--set", "name=eager", "--set", "training.compile=none").exit_code == 0
    result = invoke("train", str(experiment), "--set", "name=fallback")
    assert result.exit_code == 0, result.output
    said = [record.getMessage() for record in caplog.records if "eager steps" in record.getMessage()]
    assert said == ["training with eager steps: this model's step cannot be captured as a CUDA graph "
                    "(RuntimeError: operation not permitted when stream is capturing)"]  # one line
    train = json.loads((tmp_path / "runs" / "fallback" / "metrics.json").read_text())["train"]
    assert train["steps"] == "eager"
    assert train["kernels"] == {
        "step": "eager",
        "why": "this model's step cannot be captured as a CUDA graph (RuntimeError: operation not permitted when stream is capturing)",
        "fused": [], "not_fused": "eager steps: the fused kernels run only inside a CUDA graph step",
    }
    # The abandoned attempt leaves nothing behind: the run is the eager run, bit for bit.
    eager = load_file(tmp_path / "runs" / "eager" / "model" / "model.safetensors")
    fallback = load_file(tmp_path / "runs" / "fallback" / "model" / "model.safetensors")
    assert all(torch.equal(eager[name], fallback[name]) for name in eager)


def test_compile_cuda_graphs_names_a_step_that_cannot_be_captured(make_experiment, tmp_path, uncapturable_step):
    experiment = make_experiment(backend="loop", training={"epochs": 1, "compile": "cuda_graphs"})
    result = invoke("train", str(experiment))
    assert result.exit_code == 2
    assert "cannot be captured as a CUDA graph (RuntimeError: operation not permitted when stream is capturing)" in result.output
    assert "training.compile: auto" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny" / "model").exists()
