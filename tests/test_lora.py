"""LoRA runs (adapter/ and merged model/, evaluate and predict on either), gradient checkpointing, the optimizer choice."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

from ftcli.config import TrainingConfig
from ftcli.lora import head_modules
from ftcli.training.optim import create_optimizer, trainer_optimizer

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def test_lora_run_saves_adapter_and_merged_model_and_both_score_the_same(make_experiment, tmp_path, tiny_model_dir):
    experiment = make_experiment(lora=LORA, training={"epochs": 3, "learning_rate": 2e-2})
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"

    # adapter/: the adapters and the trained head; model/: a plain model with the adapters merged in.
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and sorted(adapter_config["target_modules"]) == ["query", "value"]
    assert "classifier" in adapter_config["modules_to_save"]
    adapter_weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in key for key in adapter_weights) and any("classifier" in key for key in adapter_weights)
    merged = load_file(run / "model" / "model.safetensors")
    assert not any("lora" in key for key in merged)
    base = load_file(tiny_model_dir / "model.safetensors")
    layer = "encoder.layer.0.attention.self"
    assert torch.equal(merged[f"bert.{layer}.key.weight"], base[f"{layer}.key.weight"])  # frozen, not adapted
    assert not torch.equal(merged[f"bert.{layer}.query.weight"], base[f"{layer}.query.weight"])  # adapter merged in

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [event["eval_loss"] for event in events if "eval_loss" in event]
    assert eval_losses[-1] < eval_losses[0]  # it learns, if slowly: the tiny model's embeddings are random and frozen

    merged_scores = invoke("evaluate", str(run))
    adapter_scores = invoke("evaluate", str(run), "--adapter")
    assert merged_scores.exit_code == 0 and adapter_scores.exit_code == 0, adapter_scores.output
    on_model = json.loads((run / "eval_validation.json").read_text())
    on_adapter = json.loads((run / "adapter" / "eval_validation.json").read_text())
    assert on_adapter["accuracy"] == on_model["accuracy"]
    assert abs(on_adapter["loss"] - on_model["loss"]) < 1e-5

    from_model = invoke("predict", str(run), "--text", "the film was great")
    from_adapter = invoke("predict", str(run), "--adapter", "--text", "the film was great")
    assert from_adapter.exit_code == 0, from_adapter.output
    model_row, adapter_row = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (from_model, from_adapter))
    assert adapter_row["predicted_label"] == model_row["predicted_label"]
    assert abs(adapter_row["probability"] - model_row["probability"]) < 1e-5


def test_lora_with_the_loop_backend_keeps_the_best_adapter_checkpoint(make_experiment, tmp_path):
    # Uncalibrated, so that the kept model's scores are the best checkpoint's own.
    experiment = make_experiment(
        backend="loop", lora=LORA, calibration="none", training={"max_steps": 8, "eval_every": 4, "save_every": 4}
    )
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "metrics.json").read_text())["train"]["best_checkpoint"]
    assert (run / "checkpoints" / "checkpoint-4" / "adapter_config.json").is_file()  # loop checkpoints hold the adapter
    assert best and (run / "adapter" / "adapter_model.safetensors").is_file()

    # A LoRA checkpoint is scored as the base model with that checkpoint's adapter on top.
    scored = invoke("evaluate", str(run), "--checkpoint", best)
    assert scored.exit_code == 0, scored.output
    at_best = json.loads((run / "checkpoints" / best.rsplit("/", 1)[-1] / "eval_validation.json").read_text())
    kept = json.loads((run / "metrics.json").read_text())["validation"]
    assert abs(at_best["loss"] - kept["loss"]) < 1e-5  # the kept model is the best checkpoint's


def test_adapter_option_on_a_run_without_lora_is_a_clear_error(make_experiment, tmp_path):
    experiment = make_experiment(training={"max_steps": 4, "eval_every": 2, "save_every": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    result = invoke("evaluate", str(tmp_path / "runs" / "tiny"), "--adapter")
    assert result.exit_code == 2
    assert "no adapter/" in result.output and "lora" in result.output


def test_unknown_lora_target_modules_fail_before_the_run_directory_exists(make_experiment, tmp_path):
    experiment = make_experiment(lora={"target_modules": ["q_proj"]})
    result = invoke("train", str(experiment))
    assert result.exit_code == 2
    assert "lora:" in result.output and "query" in result.output  # the hint lists the layers there are
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("backend", ["trainer", "loop"])
def test_gradient_checkpointing_changes_memory_not_results(make_experiment, tmp_path, backend):
    """Recomputed activations give the same losses: same seed, same dropout masks, same numbers."""
    losses = {}
    for checkpointing in (False, True):
        experiment = make_experiment(
            name=f"gc-{checkpointing}",
            backend=backend,
            lora=LORA,
            training={"max_steps": 6, "logging_steps": 1, "eval_every": 3, "save_every": 3, "gradient_checkpointing": checkpointing},
        )
        result = invoke("train", str(experiment))
        assert result.exit_code == 0, result.output
        events = (tmp_path / "runs" / f"gc-{checkpointing}" / "metrics.jsonl").read_text().splitlines()
        losses[checkpointing] = [json.loads(line)["train_loss"] for line in events if "train_loss" in line]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


@pytest.mark.parametrize("transformers_names", ["activation_checkpointing", "gradient_checkpointing only"])
def test_gradient_checkpointing_is_on_in_the_model_to_train(make_experiment, monkeypatch, transformers_names):
    from transformers import PreTrainedModel

    from ftcli.config import load_config
    from ftcli.runtime import Runtime
    from ftcli.training.recipe import setup_data, setup_model

    renamed = hasattr(PreTrainedModel, "activation_checkpointing_enable")  # transformers after 5.17
    if transformers_names == "activation_checkpointing" and not renamed:
        pytest.skip("this transformers has the old names only: the other case runs them")
    if transformers_names == "gradient_checkpointing only" and renamed:  # simulate the old names
        enable = PreTrainedModel.activation_checkpointing_enable

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            enable(self, activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", gradient_checkpointing_enable)
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
    config = load_config(make_experiment(lora=LORA, training={"gradient_checkpointing": True}))
    source, _, prepared = setup_data(config)
    model, notes = setup_model(config, source, prepared.label_names, Runtime.resolve("fp32"))
    assert notes["gradient_checkpointing"] is True and notes["gradient_checkpointing_reason"] == "training.gradient_checkpointing: true"
    wrapped = model.base_model.model  # the model peft wraps
    assert wrapped.is_activation_checkpointing if renamed else wrapped.is_gradient_checkpointing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_adamw_8bit_without_cuda_is_a_clear_error_and_writes_nothing(make_experiment, tmp_path):
    experiment = make_experiment(training={"optimizer": "adamw_8bit"})
    result = invoke("train", str(experiment))
    assert result.exit_code == 2
    assert "adamw_8bit needs a CUDA GPU" in result.output and "training.optimizer=adamw" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


def test_optimizer_choice_for_each_backend():
    assert trainer_optimizer("adamw", torch.device("cpu")) == "adamw_torch_fused"  # fused runs on the CPU too
    assert trainer_optimizer("adamw", torch.device("cuda")) == "adamw_torch_fused"
    assert trainer_optimizer("adamw_8bit", torch.device("cuda")) == "adamw_bnb_8bit"
    layer = torch.nn.Linear(4, 2)
    groups = [{"params": [layer.weight], "weight_decay": 0.1}, {"params": [layer.bias], "weight_decay": 0.0}]
    optimizer = create_optimizer(groups, TrainingConfig(learning_rate=3e-4), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert optimizer.defaults["fused"]


def test_the_head_trained_in_full_is_every_new_top_level_module():
    tiny = {"vocab_size": 50, "max_position_embeddings": 16}
    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, **tiny))
    distilbert = DistilBertForSequenceClassification(DistilBertConfig(dim=8, n_layers=1, n_heads=1, hidden_dim=8, **tiny))
    assert head_modules(bert) == ["classifier"]
    assert head_modules(distilbert) == ["pre_classifier", "classifier"]
