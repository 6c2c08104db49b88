"""ftcli audit: K-fold cross-validation of the training split, out-of-fold probabilities, and the
training labels that are probably wrong (cleanlab), on tiny models and learnable synthetic data."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import invoke, regression_rows, sentiment_rows, write_rows
from ftcli.commands.audit import run_audit
from ftcli.config import FoldConfig, load_config
from ftcli.data.folds import fold_of_documents, select_documents

pytest.importorskip("cleanlab")

FLIPPED = [3, 17, 30, 44, 58, 71, 85, 99, 112, 126, 140, 153]  # training rows given the other label


def flipped_experiment(make_experiment, tmp_path: Path, epochs: int = 8) -> Path:
    rows = sentiment_rows(160, seed=1)
    for index in FLIPPED:
        rows[index]["label"] = "negative" if rows[index]["label"] == "positive" else "positive"
    train = write_rows(tmp_path / "noisy" / "train.jsonl", rows)
    # A gentle learning rate: at 5e-3 the tiny model sometimes fails to learn a noisy fold at all.
    return make_experiment(data={"train": str(train)}, training={"epochs": epochs, "learning_rate": 1e-3})


@pytest.mark.slow
def test_audit_finds_flipped_labels_and_cross_validates(make_experiment, tmp_path):
    experiment = flipped_experiment(make_experiment, tmp_path)
    result = run_audit(load_config(experiment), folds=4)

    # The flipped rows lead the ranking: most of them among the first len(FLIPPED) issues.
    top = [issue["index"] for issue in result.issues[: len(FLIPPED)]]
    assert len(set(top) & set(FLIPPED)) >= 9, (top, result.issues[:20])
    first = result.issues[0]
    assert first["suggested"] != first["given"] and first["quality"] < 0.5
    # Cross-validated metrics: one value per fold, their mean and spread.
    accuracy = result.metrics["accuracy"]
    assert len(accuracy["folds"]) == 4 and accuracy["mean"] == pytest.approx(np.mean(accuracy["folds"]))
    assert accuracy["std"] == pytest.approx(np.std(accuracy["folds"], ddof=1))
    assert 0.75 < accuracy["mean"] < 0.97  # learned, and the flipped rows count against it

    folder = tmp_path / "runs" / "tiny-audit"
    with (folder / "label_issues.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [int(row["index"]) for row in table] == [issue["index"] for issue in result.issues]
    assert table[0]["rank"] == "1" and table[0]["text"] == sentiment_rows(160, seed=1)[int(table[0]["index"])]["text"]
    out_of_fold = [json.loads(line) for line in (folder / "out_of_fold.jsonl").read_text().splitlines()]
    assert len(out_of_fold) == 160 and all(abs(sum(line["out_of_fold"]) - 1) < 1e-4 for line in out_of_fold)
    # Every example is scored by the one fold that never trained on it.
    assert sorted({line["fold"] for line in out_of_fold}) == [0, 1, 2, 3]
    assert json.loads((folder / "cross_validation.json").read_text())["metrics"]["accuracy"]["folds"] == accuracy["folds"]
    page = (folder / "report.html").read_text()
    assert "Label issues" in page and "Cross-validation: 4 folds" in page

    # Each fold is an ordinary run: its config names the fold, its validation is that fold.
    fold = yaml.safe_load((folder / "tiny-fold-2" / "config.yaml").read_text())
    assert fold["data"]["fold"] == {"folds": 4, "index": 2, "seed": 42}
    predictions = (folder / "tiny-fold-2" / "predictions_validation.jsonl").read_text().splitlines()
    held_out = {line["text"] for line in out_of_fold if line["fold"] == 2}
    assert {json.loads(line)["text"] for line in predictions} == held_out


@pytest.mark.slow
def test_audit_again_keeps_finished_folds_and_refuses_another_config(make_experiment, tmp_path):
    experiment = flipped_experiment(make_experiment, tmp_path, epochs=1)
    first = run_audit(load_config(experiment), folds=2)
    figures = sorted((tmp_path / "runs" / "tiny-audit").glob("tiny-fold-*/*.png"))
    drawn = [path.stat().st_mtime_ns for path in figures]
    again = run_audit(load_config(experiment), folds=2)
    assert first.trained == 2 and again.trained == 0
    assert again.issues == first.issues and again.metrics == first.metrics
    # report.html shows the figures each fold drew when it trained: they are not drawn again.
    assert len(figures) == 4 and [path.stat().st_mtime_ns for path in figures] == drawn

    # A fold left without its final model (interrupted) is trained again; the other is kept.
    fold = tmp_path / "runs" / "tiny-audit" / "tiny-fold-1"
    metrics = json.loads((fold / "metrics.json").read_text())
    (fold / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "train"}))
    assert run_audit(load_config(experiment), folds=2).trained == 1

    changed = invoke("audit", str(experiment), "--folds", "2", "--set", "training.learning_rate=5e-4")
    assert changed.exit_code == 2 and "trained with another config" in changed.output and "--overwrite" in changed.output
    assert "Traceback" not in changed.output


def test_audit_user_errors(make_experiment, tmp_path, monkeypatch):
    experiment = make_experiment(train_size=6, eval_size=4)
    too_many = invoke("audit", str(experiment), "--folds", "8")
    assert too_many.exit_code == 2 and "8 folds need at least 8 training examples, and there are 6" in too_many.output
    assert not (tmp_path / "runs" / "tiny-audit").exists() or not any((tmp_path / "runs" / "tiny-audit").iterdir())

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # as if not installed
    missing = invoke("audit", str(experiment), "--folds", "2")
    assert missing.exit_code == 2 and "pip install 'ftcli[audit]'" in missing.output


@pytest.mark.slow
def test_regression_audit_flags_corrupted_scores(make_experiment, tmp_path):
    rows = regression_rows(128, seed=1)
    corrupted = [5, 40, 77, 101]
    for index in corrupted:
        rows[index]["score"] = 3.0 - rows[index]["score"] + 6.0  # far outside 0..3
    train = write_rows(tmp_path / "scores" / "train.jsonl", rows)
    experiment = make_experiment(
        task="regression", metrics=["pearson", "mse"],
        data={"train": str(train), "validation": None, "label_field": "score"}, training={"epochs": 6},
    )
    result = run_audit(load_config(experiment), folds=2)
    assert set(corrupted) <= {issue["index"] for issue in result.issues[:6]}
    assert set(result.metrics) >= {"pearson", "mse"}


def test_folds_are_stratified_partitions_and_keep_windows_together():
    from datasets import Dataset

    labels = [0] * 30 + [1] * 10
    train = Dataset.from_dict({"labels": labels, "length": [5] * 40})
    assignment = fold_of_documents(train, "single_label", FoldConfig(folds=5, index=0, seed=3))
    for fold in range(5):
        held = np.asarray(labels)[assignment == fold]
        assert len(held) == 8 and held.sum() == 2  # each fold has the training split's 3:1
    assert not np.array_equal(assignment, fold_of_documents(train, "single_label", FoldConfig(folds=5, index=0, seed=4)))

    windows = Dataset.from_dict({"doc": [0, 0, 1, 2, 2, 2], "labels": [1, 1, 0, 1, 1, 1]})
    selected = select_documents(windows, np.array([0, 2]))
    assert selected["doc"] == [0, 0, 1, 1, 1]  # both documents' windows, renumbered
