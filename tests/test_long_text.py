"""Long documents (data.long_text: window): texts longer than max_length are split into overlapping
windows that train with their document's label and are put back together per document for
evaluation, calibration and prediction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NEGATIVE, POSITIVE, invoke, multi_label_rows, regression_rows, write_rows

from ftcli.config import DataConfig
from ftcli.tasks.multi_label import MultiLabelObjective
from ftcli.tasks.regression import RegressionObjective
from ftcli.tasks.single_label import SingleLabelObjective
from ftcli.training.finalize import _temperature

MAX_LENGTH, STRIDE = 24, 8


def late_label_rows(count: int, seed: int) -> list[dict]:
    """Long texts whose label shows only at their end: 24 words of the same filler, then 8 words of
    praise or of panning. Truncated to MAX_LENGTH tokens every text reads the same."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = POSITIVE if index % 2 else NEGATIVE
        tail = " ".join(rng.choice(words) for _ in range(8))
        rows.append({"text": "plain " * 24 + tail, "label": ["negative", "positive"][index % 2]})
    return rows


def experiment(root: Path, model_dir: Path, long_text: str, backend: str = "loop", **training) -> Path:
    data = root / "data"
    train = write_rows(data / "train.jsonl", late_label_rows(128, seed=1))
    validation = write_rows(data / "validation.jsonl", late_label_rows(32, seed=2))
    config = {
        "name": f"{long_text}-{backend}",
        "backend": backend,
        "output_dir": str(root / "runs"),
        "model": str(model_dir),
        "data": {"train": str(train), "validation": str(validation), "max_length": MAX_LENGTH, "long_text": long_text, "stride": STRIDE},
        "training": {"epochs": 5, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 8, "precision": "fp32"} | training,
    }
    path = root / f"{long_text}-{backend}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluations(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [event for event in events if "eval_accuracy" in event]


@pytest.fixture(scope="module")
def windowed_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("windows")
    result = invoke("train", str(experiment(root, tiny_model_dir, "window")))
    assert result.exit_code == 0, result.output
    return root / "runs" / "window-loop"


def test_a_label_at_the_end_is_learned_with_windows_and_missed_with_truncation(windowed_run, tmp_path, tiny_model_dir):
    assert max(event["eval_accuracy"] for event in evaluations(windowed_run)) >= 0.9
    truncated = invoke("train", str(experiment(tmp_path, tiny_model_dir, "truncate", epochs=2)))
    assert truncated.exit_code == 0, truncated.output
    # Truncated, every validation text is the same filler: one prediction for all, half of them right.
    assert {event["eval_accuracy"] for event in evaluations(tmp_path / "runs" / "truncate-loop")} == {0.5}


@pytest.mark.slow
def test_the_trainer_backend_learns_from_windows_too(tmp_path, tiny_model_dir):
    result = invoke("train", str(experiment(tmp_path, tiny_model_dir, "window", backend="trainer")))
    assert result.exit_code == 0, result.output
    scores = evaluations(tmp_path / "runs" / "window-trainer")
    assert len(scores) == 5 and max(event["eval_accuracy"] for event in scores) >= 0.9


def test_prepare_reports_the_documents_split_into_windows(windowed_run):
    result = invoke("prepare", str(windowed_run))
    assert result.exit_code == 0, result.output
    assert "split into windows" in result.output and "truncated" not in result.output
    from transformers import AutoTokenizer

    from ftcli.config import load_config
    from ftcli.data.prepare import prepare

    config = load_config(windowed_run)
    prepared = prepare(config.data, AutoTokenizer.from_pretrained(windowed_run / "model"), config.task)
    assert prepared.cache_hit
    train = prepared.summary["train"]
    assert (train.size, train.windowed) == (128, 128)
    assert train.windows == len(prepared.splits["train"]) > 128
    documents = np.asarray(prepared.splits["train"]["doc"])
    assert sorted(set(documents)) == list(range(128))
    assert all(length <= MAX_LENGTH for length in prepared.splits["train"]["length"])


def test_evaluate_and_predict_answer_per_document(windowed_run, tmp_path):
    result = invoke("evaluate", str(windowed_run))
    assert result.exit_code == 0, result.output
    kept = (windowed_run / "predictions_validation.jsonl").read_text().splitlines()
    assert len(kept) == 32  # documents, not windows
    record = json.loads((windowed_run / "eval_validation.json").read_text())
    assert record["accuracy"] >= 0.9
    documents = late_label_rows(6, seed=3)
    write_rows(tmp_path / "in.jsonl", [{"text": row["text"]} for row in documents])
    predicted = invoke("predict", str(windowed_run), "--input", str(tmp_path / "in.jsonl"))
    assert predicted.exit_code == 0, predicted.output
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [row["predicted_label"] for row in rows] == [row["label"] for row in documents]


def test_a_server_reads_long_texts_in_windows_and_answers_as_predict_does(windowed_run, tmp_path):
    """ftcli serve's model (serving.served): each long text's windows, forwarded and put together,
    give ftcli predict's probabilities."""
    from ftcli.serving.batcher import Batcher
    from ftcli.serving.metrics import ServingMetrics
    from ftcli.serving.served import load_served

    documents = late_label_rows(4, seed=4)
    write_rows(tmp_path / "in.jsonl", [{"text": row["text"]} for row in documents])
    predicted = invoke("predict", str(windowed_run), "--input", str(tmp_path / "in.jsonl"))
    assert predicted.exit_code == 0, predicted.output
    expected = [json.loads(line) for line in predicted.stdout.splitlines()]

    served = load_served(windowed_run, engine="torch")
    batcher = Batcher(served.engine, served.tokenizer.pad_token_id, MAX_LENGTH, 64, 0, 1024, ServingMetrics(64))
    inputs = [(row["text"],) for row in documents]
    rows = served.encode(inputs)
    assert all(len(windows) > 1 for windows in rows)  # each text read in several windows
    answers = served.predictions(inputs, rows, [batcher.forward(windows) for windows in rows])
    assert [answer["predicted_label"] for answer in answers] == [row["predicted_label"] for row in expected]
    for answer, row in zip(answers, expected):
        assert answer["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)


def test_calibration_of_windows_keeps_every_documents_prediction():
    # Two-class documents of three windows: one sure window and two leaning the other way. A
    # temperature below 1 makes the sure window count for less in the mean and can flip a document.
    generator = torch.Generator().manual_seed(0)
    sure = torch.randn(300, generator=generator).sign() * (2 + torch.rand(300, generator=generator))
    leaning = -sure.sign()[:, None] * (0.3 + 0.4 * torch.rand(300, 2, generator=generator))
    margins = torch.cat([sure[:, None], leaning], dim=1).reshape(-1)
    rows = torch.stack([torch.zeros_like(margins), margins], dim=1)
    documents = (torch.arange(900) // 3, 300)
    labels = (sure < 0).long()  # the documents' labels disagree with their sure windows: sharpen, says the fit
    objective = SingleLabelObjective()
    before = objective.predictions(objective.aggregate(rows, *documents))
    from ftcli.objective import fit_temperature

    best = fit_temperature(objective, rows, labels, documents)
    assert not np.array_equal(objective.predictions(objective.aggregate(rows / best, *documents)), before)
    chosen = _temperature(objective, rows, labels, documents)
    after = objective.predictions(objective.aggregate(rows / chosen, *documents)) if chosen else before
    assert np.array_equal(after, before)


def test_windows_put_together_by_task():
    documents = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    single = SingleLabelObjective()
    probabilities = single.scores(single.aggregate(logits, documents, 3))
    expected = torch.stack([logits[rows].softmax(-1).mean(0) for rows in ([0, 1], [2], [3, 4, 5])])
    torch.testing.assert_close(probabilities, expected)
    multi = MultiLabelObjective()
    highest = multi.scores(multi.aggregate(logits, documents, 3))
    torch.testing.assert_close(highest, torch.stack([logits[rows].sigmoid().amax(0) for rows in ([0, 1], [2], [3, 4, 5])]), atol=1e-6, rtol=0)
    values = RegressionObjective().aggregate(logits[:, :1], documents, 3)
    torch.testing.assert_close(values, torch.stack([logits[rows, :1].mean(0) for rows in ([0, 1], [2], [3, 4, 5])]))
    labels = torch.tensor([1, 1, 0, 2, 2, 2])
    assert single.aggregate_labels(labels, documents, 3).tolist() == [1, 0, 2]


def test_pairs_window_the_first_text_and_keep_the_second_whole(tiny_model_dir):
    from transformers import AutoTokenizer

    from ftcli.data.prepare import tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = DataConfig(train="unused.jsonl", text_fields=["premise", "claim"], max_length=20, long_text="window", stride=4)
    rows = [{"premise": "plain " * 40 + "end", "claim": "a short claim"}, {"premise": "brief", "claim": "a short claim"}]
    dataset = tokenize_rows(rows, data, tokenizer)
    claim = tokenizer("a short claim", add_special_tokens=False)["input_ids"]
    assert dataset["doc"].count(0) > 2 and dataset["doc"].count(1) == 1
    for ids in dataset["input_ids"]:
        assert len(ids) <= 20 and ids[-len(claim) - 1 : -1] == claim


@pytest.mark.parametrize(
    ("task", "rows", "field"), [("multi_label", multi_label_rows, "labels"), ("regression", regression_rows, "score")]
)
def test_windowed_multi_label_and_regression_score_documents(task, rows, field, tmp_path, tiny_model_dir):
    padded = [row | {"text": "plain " * 20 + row["text"]} for row in rows(64, seed=1)]
    config = {
        "name": task,
        "task": task,
        "output_dir": str(tmp_path / "runs"),
        "model": str(tiny_model_dir),
        "data": {
            "train": str(write_rows(tmp_path / "train.jsonl", padded)),
            "validation": str(write_rows(tmp_path / "validation.jsonl", padded[:24])),
            "label_field": field, "max_length": 16, "long_text": "window", "stride": 4,
        },
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 4, "save_every": 4, "precision": "fp32"},
    }
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
    result = invoke("train", str(tmp_path / "experiment.yaml"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / task
    assert invoke("evaluate", str(run)).exit_code == 0
    assert len((run / "predictions_validation.jsonl").read_text().splitlines()) == 24
    write_rows(tmp_path / "in.jsonl", [{"text": row["text"]} for row in padded[:5]])
    predicted = invoke("predict", str(run), "--input", str(tmp_path / "in.jsonl"))
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 5


def test_a_stride_that_barely_advances_and_a_second_text_that_fills_the_window_are_one_line(tmp_path, tiny_model_dir, make_experiment):
    path = make_experiment(data={"long_text": "window", "stride": 16, "max_length": 32})
    result = invoke("train", str(path))
    assert result.exit_code == 2 and "data.stride=16 must be below half of data.max_length=32" in result.output
    long_second = make_experiment(pair=True, data={"long_text": "window", "stride": 2, "max_length": 8})
    result = invoke("prepare", str(long_second))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "leaves 2 for the windowed text, not more than data.stride=2" in result.output and "raise data.max_length" in result.output
