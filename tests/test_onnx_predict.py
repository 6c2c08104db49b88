"""ftcli predict on the ONNX export (onnx_predict): the tokens transformers would give, the fields
the torch engine gives for every task, and the export used only while it is current."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import invoke, multi_label_rows, regression_rows, write_rows
from transformers import AutoTokenizer

from ftcli.commands import predict as predict_command
from ftcli.config import DataConfig
from ftcli.data.prepare import tokenize_rows
from ftcli.onnx_predict import encode, load_tokenizer

QUICK = {"max_steps": 4, "eval_every": 2, "save_every": 2, "eval_batch_size": 4}  # 4: several batches, padded
LONG = " ".join(["the film was wonderful and the cast superb"] * 8)  # far beyond max_length
UNICODE = "naïve café — Ünïcödé 東京の映画 🎬 ﬁne"
TEXTS = ["the film was great", LONG, UNICODE, "awful", "a dreadful plot and a boring ending", ""]
PAIRS = [
    {"sentence1": "the film was great", "sentence2": "a superb cast"},
    {"sentence1": LONG, "sentence2": "poor"},
    {"sentence1": "lovely", "sentence2": LONG},
    {"sentence1": LONG, "sentence2": LONG + " and more"},
    {"sentence1": UNICODE, "sentence2": "東京 🎬"},
    {"sentence1": "an awful story", "sentence2": "a dreadful plot"},
]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_onnx_path_tokenizes_as_tokenize_rows(tiny_model_dir, tmp_path, side):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, truncation_side=side)
    tokenizer.save_pretrained(tmp_path)
    fast, pad_token_id = load_tokenizer(tmp_path, max_length=16)
    assert pad_token_id == tokenizer.pad_token_id
    for rows, fields in (([{"text": text} for text in TEXTS], ["text"]), (PAIRS, ["sentence1", "sentence2"])):
        expected = tokenize_rows(rows, DataConfig(train="train.jsonl", text_fields=fields, max_length=16), tokenizer)
        encodings = encode(fast, rows, fields)
        assert [encoding.ids for encoding in encodings] == expected["input_ids"]
        assert [encoding.type_ids for encoding in encodings] == expected["token_type_ids"]
        assert [encoding.attention_mask for encoding in encodings] == expected["attention_mask"]
        assert max(len(ids) for ids in expected["input_ids"]) == 16  # the long texts were truncated


def _experiment(kind: str, make_experiment, tmp_path):
    """A quick run of each kind of prediction: pairs, a decision threshold (saved as a tuned one
    is: four steps tune none but 0.5), per-label thresholds, a clipped value."""
    if kind == "pairs":
        return make_experiment(pair=True, training=QUICK)
    if kind == "decision_threshold":
        return make_experiment(training=QUICK, decision_threshold=0.3)
    rows, field, task, metrics = {
        "multi_label": (multi_label_rows, "labels", "multi_label", ["f1_micro"]),
        "regression": (regression_rows, "score", "regression", ["mse"]),
    }[kind]
    data = {
        "train": str(write_rows(tmp_path / "data" / f"{kind}-train.jsonl", rows(64, seed=1))),
        "validation": str(write_rows(tmp_path / "data" / f"{kind}-validation.jsonl", rows(32, seed=2))),
        "label_field": field,
    }
    if task == "regression":
        data |= {"label_range": [-1.0, 4.0], "clip_predictions": True}
    return make_experiment(training=QUICK, task=task, metrics=metrics, data=data)


def _exported(experiment, tmp_path):
    assert (trained := invoke("train", str(experiment))).exit_code == 0, trained.output
    run = tmp_path / "runs" / "tiny"
    assert (exported := invoke("export", str(run))).exit_code == 0, exported.output
    return run


def _predictions(run, inputs, *options):
    result = invoke("predict", str(run), "--input", str(inputs), *options)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("kind", ["pairs", "decision_threshold", "multi_label", "regression"])
def test_the_onnx_engine_predicts_what_torch_predicts(kind, make_experiment, tmp_path):
    run = _exported(_experiment(kind, make_experiment, tmp_path), tmp_path)
    rows = PAIRS if kind == "pairs" else [{"text": text} for text in TEXTS]
    inputs = write_rows(tmp_path / "inputs.jsonl", rows)
    onnx = _predictions(run, inputs, "--engine", "onnx")
    torch = _predictions(run, inputs, "--engine", "torch", "--precision", "fp32")
    assert len(onnx) == len(torch) == len(rows)
    for ours, theirs in zip(onnx, torch):
        assert ours.keys() == theirs.keys()
        if kind == "regression":
            assert ours["prediction"] == pytest.approx(theirs["prediction"], abs=1e-5)
            assert -1.0 <= ours["prediction"] <= 4.0
            continue
        assert ours.get("predicted_label") == theirs.get("predicted_label")
        assert ours.get("predicted_labels") == theirs.get("predicted_labels")
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)
    if kind == "decision_threshold":  # the export's threshold decided, and not as the larger probability would
        ((second, threshold),) = json.loads((run / "export" / "thresholds.json").read_text())["thresholds"].items()
        assert all((row["predicted_label"] == second) == (row["probabilities"][second] >= threshold) for row in onnx)
        assert any(threshold <= row["probabilities"][second] < 0.5 for row in onnx)
    if kind == "multi_label":  # and each label's
        thresholds = json.loads((run / "export" / "thresholds.json").read_text())["thresholds"]
        assert all(row["predicted_labels"] == [name for name, at in thresholds.items() if row["probabilities"][name] >= at] for row in onnx)


def test_auto_predicts_with_the_export_only_while_it_is_current(make_experiment, tmp_path, monkeypatch):
    run = _exported(make_experiment(training=QUICK), tmp_path)
    engines = []
    for name in ("predict_with_export", "_predict_with_torch"):
        original = getattr(predict_command, name)
        monkeypatch.setattr(predict_command, name, lambda *args, original=original, name=name: engines.append(name) or original(*args))
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert invoke("predict", str(run), "--text", "a lovely film").exit_code == 0
    assert invoke("predict", str(run), "--text", "a lovely film", "--checkpoint", str(checkpoint)).exit_code == 0
    assert invoke("predict", str(run), "--text", "a lovely film", "--precision", "auto").exit_code == 0
    assert engines == ["predict_with_export", "_predict_with_torch", "_predict_with_torch"]

    weights = run / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))  # as a new save would
    engines.clear()
    assert invoke("predict", str(run), "--text", "a lovely film").exit_code == 0
    assert engines == ["_predict_with_torch"]
    stale = invoke("predict", str(run), "--text", "a lovely film", "--engine", "onnx")
    assert stale.exit_code == 2 and len(stale.stderr.strip().splitlines()) <= 2, stale.output
    assert "is stale: model/ changed after it was exported" in stale.stderr and f"ftcli export {run}" in stale.stderr
    served = invoke("serve", str(run), "--engine", "onnx", "--port", "0")  # a server refuses it too
    assert served.exit_code == 2 and "is stale" in served.stderr, served.output

    shutil.rmtree(run / "export")
    missing = invoke("predict", str(run), "--text", "a lovely film", "--engine", "onnx")
    assert missing.exit_code == 2 and "has no ONNX export" in missing.stderr and f"run `ftcli export {run}` first" in missing.stderr
    assert invoke("predict", str(run), "--text", "a lovely film").exit_code == 0
    assert engines == ["_predict_with_torch", "_predict_with_torch"]
