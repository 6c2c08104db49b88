"""ftcli distill: a student trained on a teacher run's outputs (the teacher's logits on each training
row, cached once) through both backends, and the gate that weighs it against its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke, write_experiment

from ftcli.config import load_config
from ftcli.data.prepare import prepare
from ftcli.inference import document_logits, row_logits
from ftcli.runs.loading import load_run
from ftcli.runtime import Runtime
from ftcli.training import teacher as teacher_module
from ftcli.training.recipe import setup_data

CPU = Runtime(torch.device("cpu"), None)
OTHER = {"negative": "positive", "positive": "negative"}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    trained = invoke("train", str(write_experiment(folder, tiny_model_dir, name="teacher")))
    assert trained.exit_code == 0, trained.output
    return folder / "runs" / "teacher"


def _student(folder: Path, model: Path, teacher: Path, **sections) -> Path:
    distill = {"teacher": str(teacher), **sections.pop("distill", {})}
    return write_experiment(folder, model, name="student", distill=distill, **sections)


def _train_losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [event["train_loss"] for event in events if "train_loss" in event]


def test_distill_cuts_a_student_from_the_teacher_trains_it_and_writes_the_gate(teacher_run):
    result = invoke("distill", str(teacher_run), "--student", "layers:1")
    assert result.exit_code == 0, result.output
    student = teacher_run.parent / "teacher-layers1"
    config = load_config(student)
    assert config.distill.teacher == str(teacher_run.resolve())
    assert Path(config.model) == teacher_run / "students" / "layers-1"
    assert json.loads((student / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    gate = json.loads((student / "distill.json").read_text())
    teacher_side, student_side = gate["models"]["teacher"], gate["models"]["student"]
    assert gate["metric"] == "accuracy" and gate["split"] == "validation"
    assert gate["drop"] == pytest.approx(teacher_side["metrics"]["validation"]["accuracy"] - student_side["metrics"]["validation"]["accuracy"])
    assert gate["passed"] == (gate["drop"] <= 0.01)
    # The teacher's side is its own run's score on the same split.
    assert teacher_side["metrics"]["validation"]["accuracy"] == pytest.approx(json.loads((teacher_run / "metrics.json").read_text())["validation"]["accuracy"])
    assert student_side["parameters"] < teacher_side["parameters"] and set(gate["speedup"]) == {"cpu"}
    assert ("gate passed" if gate["passed"] else "gate failed") in result.output


def test_the_gate_fails_a_student_that_answers_worse_and_says_so(teacher_run, tiny_model_dir, caplog):
    # A fresh model trained for one step: a coin flip against a teacher that scores 1.0.
    result = invoke(
        "distill", str(teacher_run), "--student", str(tiny_model_dir), "--set", "training.max_steps=1", "--max-drop", "0.001",
    )
    assert result.exit_code == 0, result.output
    gate = json.loads((teacher_run.parent / f"teacher-{tiny_model_dir.name}" / "distill.json").read_text())
    assert gate["drop"] > 0.001 and gate["passed"] is False and gate["max_drop"] == 0.001
    assert "gate failed" in result.output
    assert any("failed the gate" in record.message for record in caplog.records)


def test_the_teachers_logits_are_computed_once_and_read_from_the_cache(teacher_run, tiny_model_dir, tmp_path, monkeypatch):
    config = load_config(_student(tmp_path, tiny_model_dir, teacher_run))
    _, tokenizer, prepared = setup_data(config)
    taught = teacher_module.with_teacher(config, prepared, tokenizer, CPU)
    teacher = load_run(teacher_run)
    expected = row_logits(teacher.model, prepared.splits["train"], 16, tokenizer.pad_token_id, CPU)
    assert torch.allclose(torch.tensor(taught.splits["train"]["teacher"]), expected, atol=1e-6)
    assert all(taught.splits["train"]["labeled"])

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded again")

    monkeypatch.setattr(teacher_module, "load_run", no_teacher)
    again = teacher_module.with_teacher(config, prepared, tokenizer, CPU)
    assert again.splits["train"]["teacher"] == taught.splits["train"]["teacher"]


def test_a_student_of_another_tokenizer_takes_each_documents_logits_from_the_teachers_tokens(teacher_run, tiny_model_dir, tmp_path):
    from test_architectures import tiny_encoder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_input_names=["input_ids", "attention_mask"])
    model, _ = tiny_encoder("distilbert", tokenizer.vocab_size, tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "distilbert")
    tokenizer.save_pretrained(tmp_path / "distilbert")
    # Windows of 6 tokens: a student row is a window, and takes its whole document's logits.
    data = {"max_length": 6, "long_text": "window", "stride": 1}
    config = load_config(_student(tmp_path, tmp_path / "distilbert", teacher_run, data=data))
    _, student_tokenizer, prepared = setup_data(config)
    train = prepared.splits["train"]
    assert "doc" in train.column_names and len(train) > len(set(train["doc"]))
    taught = teacher_module.with_teacher(config, prepared, student_tokenizer, CPU)

    teacher = load_run(teacher_run)
    theirs = prepare(config.data, teacher.tokenizer, config.task).splits["train"]
    per_document = document_logits(teacher.model, theirs, 16, teacher.tokenizer.pad_token_id, CPU, teacher.objective)
    assert torch.allclose(torch.tensor(taught.splits["train"]["teacher"]), per_document[torch.tensor(train["doc"])], atol=1e-6)


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_with_alpha_one_the_student_learns_from_the_teacher_alone(backend, teacher_run, tiny_model_dir, tmp_path):
    """alpha 1: the labels weigh nothing, so training labels turned upside down train the same
    student; without the teacher they do not."""
    def train(name: str, flip: bool, distill: bool) -> list[float]:
        folder = tmp_path / name
        experiment = _student(folder, tiny_model_dir, teacher_run, backend=backend, distill={"alpha": 1.0}, training={"epochs": 1}, train_size=48)
        raw = yaml.safe_load(experiment.read_text())
        if not distill:
            raw.pop("distill")
        if flip:
            rows = [json.loads(line) for line in Path(raw["data"]["train"]).read_text().splitlines()]
            Path(raw["data"]["train"]).write_text("".join(json.dumps(row | {"label": OTHER[row["label"]]}) + "\n" for row in rows))
        experiment.write_text(yaml.safe_dump(raw))
        result = invoke("train", str(experiment))
        assert result.exit_code == 0, result.output
        losses = _train_losses(folder / "runs" / "student")
        assert losses
        return losses

    taught = train("taught", flip=False, distill=True)
    assert taught == train("taught-flipped", flip=True, distill=True)
    assert train("labels", flip=False, distill=False) != taught


def test_a_teacher_of_another_task_is_one_line_before_training(teacher_run, tiny_model_dir, tmp_path):
    from conftest import regression_rows, write_rows

    experiment = _student(tmp_path, tiny_model_dir, teacher_run, task="regression", metrics=["mse"], data={"label_field": "score"})
    raw = yaml.safe_load(experiment.read_text())
    for split in ("train", "validation"):
        write_rows(Path(raw["data"][split]), regression_rows(32, seed=1))
    result = invoke("train", str(experiment))
    assert result.exit_code == 2
    assert "was trained for single_label, the student for regression" in result.output
    assert not (tmp_path / "runs" / "student" / "model").exists()


def test_unlabeled_texts_join_the_training_rows_with_the_teachers_logits_and_no_label(teacher_run, tiny_model_dir, tmp_path):
    from conftest import sentiment_rows, write_rows

    texts = [{"text": row["text"]} for row in sentiment_rows(24, seed=7)]
    unlabeled = write_rows(tmp_path / "data" / "unlabeled.jsonl", texts)
    experiment = _student(tmp_path, tiny_model_dir, teacher_run, data={"unlabeled": str(unlabeled)}, train_size=32, training={"epochs": 1})
    config = load_config(experiment)
    _, tokenizer, prepared = setup_data(config)
    taught = teacher_module.with_teacher(config, prepared, tokenizer, CPU).splits
    assert "unlabeled" not in taught and len(taught["train"]) == 32 + 24
    assert taught["train"]["labeled"] == [True] * 32 + [False] * 24
    teacher = load_run(teacher_run)
    expected = row_logits(teacher.model, prepared.splits["unlabeled"], 16, tokenizer.pad_token_id, CPU)
    assert torch.allclose(torch.tensor(taught["train"]["teacher"][32:]), expected, atol=1e-6)
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "runs" / "student" / "metrics.json").read_text())["train"]["train_samples"] == 56
