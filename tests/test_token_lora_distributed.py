"""token_classification with LoRA (peft's TOKEN_CLS, the `classifier` head trained and saved whole;
adapter/ and the merged model/ tag alike), and evaluated on several processes (per-token tensors of
different widths padded across processes before they are gathered)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke, run_cli
from safetensors.torch import load_file
from test_distributed import CPU_ONLY
from test_token_classification import ner_config, ner_rows, write_conll
from test_token_windows import long_rows

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
TEXT = "then John Smith went to Paris today"


def _with(experiment: Path, **sections) -> Path:
    """The experiment YAML with top-level sections merged in (one level deep)."""
    settings = yaml.safe_load(experiment.read_text())
    for key, value in sections.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    experiment.write_text(yaml.safe_dump(settings))
    return experiment


@pytest.fixture(scope="module", params=["loop", "trainer"])
def lora_tagger(request, tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA tagger trained with each backend: its run directory."""
    root = tmp_path_factory.mktemp(f"ner-lora-{request.param}")
    experiment = _with(
        ner_config(root, tiny_model_dir, request.param), lora=LORA, training={"epochs": 2, "learning_rate": 2e-2}
    )
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    return root / "runs" / f"ner-{request.param}"


def _entities(*args: str) -> list[dict]:
    result = invoke("predict", *args, "--text", TEXT)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    return row["entities"]


def test_a_lora_tagger_saves_its_token_head_whole_and_its_adapter_tags_as_the_merged_model(lora_tagger):
    adapter_config = json.loads((lora_tagger / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "TOKEN_CLS" and "classifier" in adapter_config["modules_to_save"]
    adapter_weights = load_file(lora_tagger / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in key for key in adapter_weights) and any("classifier" in key for key in adapter_weights)
    merged = json.loads((lora_tagger / "model" / "config.json").read_text())
    assert merged["architectures"] == ["BertForTokenClassification"]
    assert not any("lora" in key for key in load_file(lora_tagger / "model" / "model.safetensors"))

    from ftcli.runs.loading import load_run

    # The adapter on the base model, with a token-classification head: a tag per token, as model/ gives.
    on_adapter, on_model = load_run(lora_tagger, adapter=True), load_run(lora_tagger)
    inputs = on_model.tokenizer(["John Smith went to Paris", "Anna saw Rome"], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapter_logits, model_logits = (loaded.model.eval()(**inputs).logits for loaded in (on_adapter, on_model))
    assert adapter_logits.shape == model_logits.shape == (*inputs["input_ids"].shape, len(merged["id2label"]))
    torch.testing.assert_close(adapter_logits, model_logits, atol=1e-4, rtol=1e-4)

    from_model, from_adapter = _entities(str(lora_tagger)), _entities(str(lora_tagger), "--adapter")
    assert from_model, "the tagger found no entity: the comparison below would say nothing"
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in from_adapter] == [
        (e["entity_group"], e["word"], e["start"], e["end"]) for e in from_model
    ]
    assert [e["score"] for e in from_adapter] == pytest.approx([e["score"] for e in from_model], abs=1e-4)

    scored = [invoke("evaluate", str(lora_tagger), *flag) for flag in ((), ("--adapter",))]
    assert all(result.exit_code == 0 for result in scored), scored[1].output
    on_model_scores = json.loads((lora_tagger / "eval_validation.json").read_text())
    on_adapter_scores = json.loads((lora_tagger / "adapter" / "eval_validation.json").read_text())
    assert on_adapter_scores["f1"] == on_model_scores["f1"] and on_model_scores["f1"] > 0


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
def test_a_tagger_evaluated_on_two_processes_scores_as_one_process_evaluates_its_model(tmp_path, tiny_model_dir):
    """Each process's evaluation batches are as wide as their own longest sentence: padded to the
    widest across processes (logits with 0, tags with -100, places with -1) before they are
    gathered. The validation split is windowed, so the windows are put back together too."""
    rows = ner_rows(11, seed=2) + long_rows(3, seed=4)  # short sentences, and long ones cut into windows
    experiment = _with(
        ner_config(tmp_path, tiny_model_dir, "loop", max_length=16),
        calibration="none",  # the logged metrics are the model's own, as evaluate's are
        training={"batch_size": 8, "eval_batch_size": 3, "max_steps": 12, "eval_every": 12, "save_every": 12},
    )
    write_conll(Path(yaml.safe_load(experiment.read_text())["data"]["validation"]), rows)
    launched = run_cli("train", str(experiment), "--num-processes", "2", env=CPU_ONLY)
    assert launched.returncode == 0, launched.stderr[-3000:]
    run = tmp_path / "runs" / "ner-loop"

    (logged,) = [event for event in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) if "eval_f1" in event]
    scored = invoke("evaluate", str(run))
    assert scored.exit_code == 0, scored.output
    evaluated = json.loads((run / "eval_validation.json").read_text())
    assert evaluated["f1"] > 0  # it tags some entities: the comparison says something
    for metric in ("f1", "precision", "recall", "accuracy"):
        assert logged[f"eval_{metric}"] == pytest.approx(evaluated[metric], abs=1e-9), metric
    assert logged["eval_loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
