"""ftcli evaluate's error analysis: predictions_<split>.jsonl, the per-class table, the surest
mistakes and highest losses, the most confused pairs, regression's residuals, and report.html's
pictures of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import invoke

from ftcli import tasks
from ftcli.tasks.regression import residuals_by_range


def test_error_analysis_by_hand():
    names = ["a", "b", "c"]
    scores = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.8, 0.1, 0.1], [0.3, 0.4, 0.3]])
    decisions, labels = scores.argmax(1), np.array([0, 1, 1, 2, 1])
    losses = -np.log(scores[np.arange(5), labels])
    analysis = tasks.get("single_label").analyse(names, scores, decisions, labels, losses)
    assert [row["support"] for row in analysis["per_class"]] == [1, 3, 1]
    assert analysis["per_class"][1] == {"label": "b", "precision": 1.0, "recall": 2 / 3, "f1": pytest.approx(0.8), "support": 3}
    # wrong: row 2 (b predicted c at 0.6) and row 3 (c predicted a at 0.8): the surer first
    assert [(m["index"], m["true"], m["predicted"], m["probability"]) for m in analysis["confident_mistakes"]] == [(3, "c", "a", 0.8), (2, "b", "c", 0.6)]
    assert analysis["highest_loss"][0]["index"] == 3  # p(c) = 0.1
    assert analysis["confused_pairs"] == [{"true": "b", "predicted": "c", "count": 1}, {"true": "c", "predicted": "a", "count": 1}]


def test_residuals_by_range_by_hand():
    rows = residuals_by_range(np.array([0.5, 1.0, 4.0, 5.0]), np.array([0.0, 1.0, 4.5, 5.0]), bins=2)
    assert [row["count"] for row in rows] == [2, 2]
    assert rows[0]["mean_residual"] == pytest.approx(0.25) and rows[1]["mae"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """A trained two-class run, evaluated, and its report."""
    from conftest import sentiment_rows, write_rows

    root = tmp_path_factory.mktemp("evaluated")
    train = write_rows(root / "train.jsonl", sentiment_rows(64, seed=1))
    validation = write_rows(root / "validation.jsonl", sentiment_rows(24, seed=2))
    experiment = {
        "name": "run", "output_dir": str(root / "runs"), "model": str(tiny_model_dir),
        "data": {"train": str(train), "validation": str(validation), "max_length": 32},
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2, "precision": "fp32"},
    }
    (root / "experiment.yaml").write_text(json.dumps(experiment))
    assert invoke("train", str(root / "experiment.yaml")).exit_code == 0
    result = invoke("evaluate", str(root / "runs" / "run"))
    assert result.exit_code == 0, result.output
    return root / "runs" / "run", result.output


def test_evaluate_writes_every_prediction_and_the_analysis(evaluated):
    run, output = evaluated
    rows = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert set(rows[0]) == {"text", "gold", "prediction", "probabilities", "loss", "correct"}
    assert all(row["correct"] == (row["gold"] == row["prediction"]) for row in rows)
    record = json.loads((run / "eval_validation.json").read_text())
    accuracy = sum(row["correct"] for row in rows) / len(rows)
    assert record["accuracy"] == pytest.approx(accuracy)
    assert sum(row["support"] for row in record["errors"]["per_class"]) == 24
    wrong = [row for row in rows if not row["correct"]]
    assert len(record["errors"]["confident_mistakes"]) == min(len(wrong), 20)
    losses = sorted((row["loss"] for row in rows), reverse=True)
    assert [entry["loss"] for entry in record["errors"]["highest_loss"]] == pytest.approx(losses[:20], rel=1e-5)
    assert record["errors"]["highest_loss"][0]["text"] in {row["text"] for row in rows}
    assert "calibration" in record and record["calibration"]["after"]["ece"] >= 0
    assert "per class" in output and "highest loss" in output and "calibration (temperature" in output


def test_report_html_shows_the_analysis_and_the_reliability_diagram(evaluated):
    run, _ = evaluated
    assert invoke("report", str(run), "--html").exit_code == 0
    page = (run / "report.html").read_text()
    assert (run / "calibration.png").is_file()
    assert "Calibration (temperature" in page and "Errors on validation" in page
    assert "Highest loss" in page and page.count("data:image/png;base64,") >= 4  # curves, reliability, F1 bars, confusion
