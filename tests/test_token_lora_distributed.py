"""token_classification with LoRA (peft's TOKEN_CLS, the `classifier` head trained and saved whole;
adapter/ and the merged model/ tag alike), and evaluated on several processes (per-token tensors of
different widths padded across processes before they are gathered)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke
from safetensors.torch import load_file
from test_token_classification import ner_config

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
