"""ftcli distill beyond single_label (tests/test_distill.py): multi_label, regression (a metric where
lower is better) and a windowed tagger, each through both backends, its student an ordinary run; a
distilled run resumed after an interruption ends as an uninterrupted one; the gate in ftcli report."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import invoke, multi_label_rows, regression_rows, write_experiment, write_rows
from safetensors.torch import load_file
from test_token_windows import windows_config

from ftcli.config import load_config
from ftcli.inference import row_logits
from ftcli.runs.loading import load_run
from ftcli.runtime import Runtime
from ftcli.training import teacher as teacher_module
from ftcli.training.recipe import setup_data
from ftcli.training.stopping import StopSignals

CPU = Runtime(torch.device("cpu"), None)
# Per task: its rows, its label field, its metrics (the first one the gate's).
TASKS = {
    "multi_label": (multi_label_rows, "labels", ["f1_micro", "f1_macro"]),
    "regression": (regression_rows, "score", ["mse", "pearson"]),
}
LONG_TEXT = "Paris " + "then the friends went home today and later " * 6 + "and John Smith saw Tokyo ."


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir):
    """teacher(task): a run of the task trained once for the module (regression with a test split
    too), or the tagger on sentences two or three windows long."""
    trained: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in trained:
            folder = tmp_path_factory.mktemp(f"teacher-{task}")
            trained[task] = _train_teacher(folder, tiny_model_dir, task)
        return trained[task]

    return get


def _train_teacher(folder: Path, model: Path, task: str) -> Path:
    if task == "token_classification":
        experiment = windows_config(folder, model, "loop")
        run = folder / "runs" / "windows-loop"
    else:
        rows, field, metrics = TASKS[task]
        data = {"label_field": field} | {
            split: str(write_rows(folder / "data" / f"{task}-{split}.jsonl", rows(count, seed=seed)))
            for split, count, seed in (("train", 64, 1), ("validation", 32, 2), ("test", 24, 3))
            if split != "test" or task == "regression"
        }
        experiment = write_experiment(folder, model, name="teacher", task=task, metrics=metrics, data=data)
        run = folder / "runs" / "teacher"
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    return run


@pytest.fixture(scope="module")
def student(teacher):
    """student(task, backend): `ftcli distill TEACHER --student layers:1` of the task's teacher
    with that backend, once for the module; returns the student run and its distill.json."""
    distilled: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(task: str, backend: str) -> tuple[Path, dict]:
        if (task, backend) not in distilled:
            run = teacher(task)
            # The loop's student takes the default name; the trainer's is named beside it.
            name = [] if backend == "loop" else ["--set", f"name={run.name}-layers1-{backend}"]
            result = invoke("distill", str(run), "--student", "layers:1", "--set", f"backend={backend}", *name)
            assert result.exit_code == 0, result.output
            assert "gate passed" in result.output or "gate failed" in result.output
            path = run.parent / (f"{run.name}-layers1" if backend == "loop" else f"{run.name}-layers1-{backend}")
            distilled[task, backend] = path, json.loads((path / "distill.json").read_text())
        return distilled[task, backend]

    return get


def _predicted(run: Path, text: str) -> dict:
    result = invoke("predict", str(run), "--text", text)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return row


def _assert_gate(gate: dict, teacher_run: Path, student_run: Path, metric: str, splits: set[str], higher_is_better: bool) -> None:
    """distill.json: both sides scored on the same splits, the drop signed so that a worse student's is positive."""
    teacher_side, student_side = gate["models"]["teacher"], gate["models"]["student"]
    assert (gate["metric"], gate["split"], gate["teacher"], gate["student"]) == (metric, "validation", str(teacher_run.resolve()), str(student_run))
    assert set(teacher_side["metrics"]) == set(student_side["metrics"]) == splits
    before, after = teacher_side["metrics"]["validation"][metric], student_side["metrics"]["validation"][metric]
    assert gate["drop"] == pytest.approx(before - after if higher_is_better else after - before)
    assert gate["max_drop"] == 0.01 and gate["passed"] == (gate["drop"] <= 0.01)
    assert before == pytest.approx(json.loads((teacher_run / "metrics.json").read_text())["validation"][metric])
    assert student_side["parameters"] < teacher_side["parameters"] and gate["smaller"] > 1
    assert 0 < student_side["bytes"] < teacher_side["bytes"]
    assert set(gate["speedup"]) == set(student_side["examples_per_second"]) == {"cpu"}
    assert student_side["examples_per_second"]["cpu"] > 0


def _assert_evaluates_as_gated(run: Path, gate: dict) -> None:
    """`ftcli evaluate` on the student scores what the gate says it scored."""
    evaluated = invoke("evaluate", str(run))
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((run / "eval_validation.json").read_text())
    assert record[gate["metric"]] == pytest.approx(gate["models"]["student"]["metrics"]["validation"][gate["metric"]], abs=1e-6)


# ---------------------------------------------------------------- multi_label and regression


@pytest.mark.parametrize("backend", ["loop", "trainer"])
@pytest.mark.parametrize("task", ["multi_label", "regression"])
def test_a_distilled_student_is_weighed_against_its_teacher_and_is_an_ordinary_run(task, backend, teacher, student):
    run, gate = student(task, backend)
    config = load_config(run)
    assert (config.task, config.backend, config.distill.teacher) == (task, backend, str(teacher(task).resolve()))
    assert json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    metric = TASKS[task][2][0]
    splits = {"validation", "test"} if task == "regression" else {"validation"}
    _assert_gate(gate, teacher(task), run, metric, splits, higher_is_better=task == "multi_label")
    _assert_evaluates_as_gated(run, gate)
    row = _predicted(run, "the film was great and lovely")
    if task == "multi_label":
        assert set(row["probabilities"]) == {"positive", "screen"} and set(row["predicted_labels"]) <= {"positive", "screen"}
    else:
        assert isinstance(row["prediction"], float)


def test_a_regression_student_worse_than_its_teacher_has_a_positive_drop_and_fails(teacher, tiny_model_dir):
    """mse: lower is better, so the drop is the student's mse minus the teacher's."""
    run = teacher("regression")
    # A fresh model after one step answers about 0 for scores of 0 to 3: far worse than the teacher.
    result = invoke("distill", str(run), "--student", str(tiny_model_dir), "--set", "training.max_steps=1")
    assert result.exit_code == 0, result.output
    gate = json.loads((run.parent / f"teacher-{tiny_model_dir.name}" / "distill.json").read_text())
    teacher_mse, student_mse = (gate["models"][side]["metrics"]["validation"]["mse"] for side in ("teacher", "student"))
    assert student_mse > teacher_mse + 0.1
    assert gate["drop"] == pytest.approx(student_mse - teacher_mse) and gate["drop"] > 0
    assert gate["passed"] is False and "gate failed" in result.output


# ---------------------------------------------------------------- token_classification, in windows


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_windowed_tagger_is_distilled_and_its_student_tags_whole_sentences(backend, teacher, student):
    run, gate = student("token_classification", backend)
    assert load_config(run).data.long_text == "window"
    _assert_gate(gate, teacher("token_classification"), run, "f1", {"validation"}, higher_is_better=True)
    _assert_evaluates_as_gated(run, gate)
    lines = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(len(line["prediction"]) == len(line["tokens"]) for line in lines)  # sentences, not windows
    found = _predicted(run, LONG_TEXT)["entities"]
    assert all(LONG_TEXT[entity["start"] : entity["end"]] == entity["word"] for entity in found)


def test_a_windowed_taggers_teacher_logits_are_per_window_row_and_token(teacher, student):
    run, _ = student("token_classification", "loop")
    config = load_config(run)
    _, tokenizer, prepared = setup_data(config)
    rows = prepared.splits["train"]
    assert len(rows) > len(set(rows["doc"])) and max(rows["length"]) <= config.data.max_length  # windows
    taught = teacher_module.with_teacher(config, prepared, tokenizer, CPU).splits["train"]  # the cache distill wrote
    assert [len(values) for values in taught["teacher"]] == rows["length"]
    tagger = load_run(teacher("token_classification"))
    expected = row_logits(tagger.model, rows, 16, tokenizer.pad_token_id, CPU)
    for index, values in enumerate(taught["teacher"]):
        assert torch.allclose(torch.tensor(values), expected[index, : rows["length"][index]], atol=1e-6), index


# ---------------------------------------------------------------- exact resume


def _sigterm_at(monkeypatch, step: int) -> None:
    """A SIGTERM that arrives during optimizer step `step`: delivered to the handler training holds."""
    asked = StopSignals.requested

    def requested(self: StopSignals, optimizer_step: int) -> int:
        if optimizer_step == step:
            self._handle(signal.SIGTERM, None)
        return asked(self, optimizer_step)

    monkeypatch.setattr(StopSignals, "requested", requested)


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_distilled_run_stopped_after_a_checkpoint_resumes_exactly(backend, teacher, monkeypatch):
    run = teacher("multi_label")
    schedule = [f"training.{key}={value}" for key, value in (("epochs", 1), ("save_every", 2), ("eval_every", 2), ("logging_steps", 2))]

    def distill(name: str):
        options = [option for setting in [*schedule, f"backend={backend}", f"name={name}"] for option in ("--set", setting)]
        return invoke("distill", str(run), "--student", "layers:1", *options)

    straight = run.parent / f"straight-{backend}"
    assert (done := distill(straight.name)).exit_code == 0, done.output
    stopped = run.parent / f"stopped-{backend}"
    with monkeypatch.context() as patched:
        _sigterm_at(patched, 3)  # after checkpoint-2, mid-epoch (8 steps an epoch)
        interrupted = distill(stopped.name)
    assert interrupted.exit_code == 128 + signal.SIGTERM, interrupted.output
    assert not (stopped / "model").exists() and (stopped / "checkpoints" / "checkpoint-3").is_dir()

    resumed = invoke("train", str(stopped), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((stopped / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-3")
    assert (stopped / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    expected, weights = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert expected.keys() == weights.keys() and all(torch.equal(expected[name], weights[name]) for name in expected)


# ---------------------------------------------------------------- the report


def test_the_report_of_a_student_shows_its_gate_beside_its_teacher(student):
    run, gate = student("regression", "loop")
    result = invoke("report", str(run), "--html")
    assert result.exit_code == 0, result.output
    moved = f"dropped by {gate['drop']:.4f}" if gate["drop"] >= 0 else f"improved by {-gate['drop']:.4f}"
    verdict = "passed" if gate["passed"] else "failed"
    why = f"mse on validation {moved} (max 0.01); {gate['smaller']:.2f}x fewer parameters, {gate['speedup']['cpu']:.2f}x as fast on cpu"
    output = " ".join(result.output.split())
    assert f"gate {verdict}: {why}" in output
    assert "the student beside its teacher" in output and "│ teacher │" in result.output and "│ student │" in result.output
    page = (run / "report.html").read_text()
    assert "<th>validation mse</th><th>validation pearson</th>" in page and "<th>test mse</th>" in page
    assert "<th>parameters</th><th>examples/s cpu</th>" in page
    assert f'<span class="verdict {verdict}">{verdict}</span> {why}' in page
    for side in ("teacher", "student"):
        scores = gate["models"][side]["metrics"]
        cells = [f"{scores[split][metric]:.4f}" for split in ("validation", "test") for metric in scores["validation"]]
        assert f"<tr><td>{side}</td>" + "".join(f"<td>{cell}</td>" for cell in cells) in page
        assert f"{gate['models'][side]['examples_per_second']['cpu']:,.0f}</td></tr>" in page


def test_a_run_without_a_gate_reports_none(teacher):
    result = invoke("report", str(teacher("multi_label")), "--html")
    assert result.exit_code == 0, result.output
    assert "gate" not in result.output and "Distillation gate" not in (teacher("multi_label") / "report.html").read_text()
