"""Config: defaults, validation, overrides, smoke, and every shipped YAML parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import invoke

from ftcli.config import Config, TrainingConfig, apply_override, dump_config, load_config, resolve_paths, smoke, validate
from ftcli.errors import FtcliError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.name and config.data.text_fields


def test_the_decoder_and_modernbert_templates_say_what_the_families_need():
    """Both download from the Hub, so none trains here: what they set is checked instead."""
    qwen = load_config(ROOT / "configs" / "qwen3-0.6b-qlora.yaml")
    assert qwen.model == "Qwen/Qwen3-0.6B" and qwen.task == "single_label"
    assert (qwen.lora.r, qwen.lora.quantize, qwen.training.batch_size) == (16, "4bit", 8)
    assert (qwen.training.precision, qwen.training.gradient_checkpointing) == ("bf16", "auto")
    assert qwen.data.train.endswith("shared/data/mrpc/train.jsonl")
    modernbert = load_config(ROOT / "configs" / "modernbert-base-long.yaml")
    assert modernbert.model == "answerdotai/ModernBERT-base" and modernbert.data.max_length >= 2048
    assert TrainingConfig().gradient_checkpointing == "auto"


def test_main_job_is_the_course_recipe():
    config = load_config(ROOT / "configs" / "mrpc-minilm.yaml")
    training = config.training
    assert (training.epochs, training.batch_size, training.learning_rate, training.scheduler) == (3, 8, 5e-5, "linear")
    assert training.eval_every == "epoch" and config.model == "minilm"


def test_defaults_fill_everything_left_out():
    config = validate({"name": "x", "data": {"train": "t.jsonl"}})
    assert config.backend == "loop" and config.training.batch_size == 8 and config.metrics == ["accuracy", "f1"]
    assert config.run_dir == Path("runs") / "x"


def test_overrides_parse_yaml_scalars_and_create_sections():
    raw = {"name": "x", "data": {"train": "t.jsonl"}}
    apply_override(raw, "training.learning_rate=3e-5")
    apply_override(raw, "training.eval_every=50")
    apply_override(raw, "training.save_every=100")
    apply_override(raw, "data.text_fields=[a, b]")
    apply_override(raw, "trust_remote_code=true")
    config = validate(raw)
    assert config.training.learning_rate == 3e-5 and config.training.eval_every == 50
    assert config.data.text_fields == ["a", "b"] and config.trust_remote_code is True


def test_all_problems_reported_at_once():
    with pytest.raises(FtcliError) as caught:
        validate({"name": "x", "data": {"train": "t.jsonl"}, "training": {"batch_size": 0, "learning_rate": -1}})
    assert "training.batch_size=0" in str(caught.value) and "training.learning_rate=-1" in str(caught.value)


def test_resolved_config_round_trips_with_absolute_paths(tmp_path):
    config = resolve_paths(validate({"name": "x", "data": {"train": "t.jsonl"}}), base=tmp_path)
    assert config.data.train == str(tmp_path / "t.jsonl")
    again = validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_smoke_shrinks_any_config_to_a_few_steps():
    config = smoke(load_config(ROOT / "configs" / "mrpc-minilm.yaml"))
    assert config.training.max_steps <= 8 and config.data.max_train_samples <= 64
    assert config.name.endswith("-smoke")


def test_config_command_prints_resolved_yaml(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: x\ndata: {train: t.jsonl}\n")
    result = invoke("config", str(path), "--set", "training.batch_size=16")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["training"]["batch_size"] == 16 and printed["data"]["train"].endswith("t.jsonl")
    Config.model_validate(printed)


def test_evaluate_metric_names_pass_through_but_typos_do_not():
    assert validate({"name": "x", "data": {"train": "t.jsonl"}, "metrics": ["accuracy", "glue/mrpc"]}).metrics
    with pytest.raises(FtcliError, match="did you mean 'matthews'"):
        validate({"name": "x", "data": {"train": "t.jsonl"}, "metrics": ["mathews"]})


def test_readme_config_reference_is_the_schema():
    from ftcli.config import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text(), "regenerate the README's config reference"


@pytest.mark.parametrize("name", ["mrpc-minilm", "stsb-minilm", "goemotions-minilm", "wnut17-minilm"])
def test_each_offline_config_runs_as_a_smoke_run(name, tmp_path, monkeypatch):
    """The shipped jobs on the real data in ../shared/data and the packaged MiniLM, shrunk to a few steps."""
    monkeypatch.chdir(ROOT)  # the configs name their data relative to the project
    result = invoke("train", f"configs/{name}.yaml", "--smoke", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    run = tmp_path / f"{name}-smoke"
    config = load_config(run / "config.yaml")
    validation = yaml.safe_load((run / "metrics.json").read_text())["validation"]
    assert list(validation) == ["loss", *config.metrics]
    assert (run / "model" / "thresholds.json").is_file() == (config.task == "multi_label")
