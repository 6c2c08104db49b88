"""ftcli export --format onnx: the graph, its dynamic axes, and the parity check against PyTorch."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import invoke
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftcli.commands import export

QUICK = {"max_steps": 4, "eval_every": 2, "save_every": 2}


@pytest.fixture
def trained_run(make_experiment, tmp_path):
    experiment = make_experiment(pair=True, training=QUICK)
    assert invoke("train", str(experiment)).exit_code == 0
    return tmp_path / "runs" / "tiny"


def test_export_writes_onnx_that_matches_pytorch_on_any_batch_shape(trained_run):
    result = invoke("export", str(trained_run), "--format", "onnx")
    assert result.exit_code == 0, result.output
    folder = trained_run / "export"
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not list(trained_run.glob(".export*"))  # no staging folder left behind
    difference = float(re.search(r"at most (\S+) \(tolerance", result.output).group(1))
    assert difference <= 1e-4

    # A batch of a shape the export never saw, sentence pairs with padding: same logits as PyTorch.
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        ["the film was great", "an awful and boring story that went on", "lovely"],
        ["a superb cast", "poor", "the ending was dreadful and the script was poor"],
        padding=True,
        return_tensors="np",
    )
    onnx_logits = session.run(["logits"], {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")})[0]
    model = AutoModelForSequenceClassification.from_pretrained(trained_run / "model").eval()
    with torch.no_grad():
        torch_logits = model(**{name: torch.from_numpy(array) for name, array in batch.items()}).logits.numpy()
    assert onnx_logits.shape == (3, 2)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}


def test_failed_parity_check_leaves_no_export(trained_run, monkeypatch):
    monkeypatch.setattr(export, "export_onnx", lambda model, example, target: target.write_bytes(b"graph"))
    monkeypatch.setattr(export, "max_logit_difference", lambda model, onnx_file, batch: 0.25)
    result = invoke("export", str(trained_run))
    assert result.exit_code == 2
    assert "differ from PyTorch's by up to 0.25" in result.output and "nothing was exported" in result.output
    assert not (trained_run / "export").exists() and not list(trained_run.glob(".export*"))


def test_export_without_its_packages_or_with_another_format_is_a_clear_error(trained_run, monkeypatch):
    unknown = invoke("export", str(trained_run), "--format", "tflite")
    assert unknown.exit_code == 2 and "unknown export format 'tflite'" in unknown.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it now fails, as when not installed
    missing = invoke("export", str(trained_run))
    assert missing.exit_code == 2
    assert "needs the onnxruntime package" in missing.output and "pip install 'ftcli[export]'" in missing.output
    assert not (trained_run / "export").exists()


def test_int8_export_is_kept_within_the_drop_with_both_metrics_in_the_report(trained_run):
    result = invoke("export", str(trained_run), "--quantize", "int8", "--max-drop", "0.5")
    assert result.exit_code == 0, result.output
    folder = trained_run / "export"
    assert (folder / "model.int8.onnx").is_file() and (folder / "model.onnx").is_file()
    report = json.loads((folder / "report.json").read_text())
    check = report["quantization"]
    assert check["kept"] is True and check["file"] == "model.int8.onnx" and check["metric"] == "accuracy"
    assert 0 <= check["fp32"] <= 1 and 0 <= check["int8"] <= 1 and check["drop"] == pytest.approx(check["fp32"] - check["int8"])
    assert report["sizes"]["model.int8.onnx"] < report["sizes"]["model.onnx"]
    assert report["parity"]["passed"] and report["parity"]["max_difference"] <= 1e-4
    assert "kept" in result.output and f"fp32 {check['fp32']:.4f}" in result.output


def test_int8_export_beyond_the_drop_keeps_only_fp32_and_names_both_numbers(trained_run):
    result = invoke("export", str(trained_run), "--quantize", "int8", "--max-drop", "-1")
    assert result.exit_code == 0, result.output
    folder = trained_run / "export"
    assert (folder / "model.onnx").is_file() and not (folder / "model.int8.onnx").exists()
    check = json.loads((folder / "report.json").read_text())["quantization"]
    assert check["kept"] is False and check["file"] is None
    assert "int8 model not kept" in result.output
    assert f"fp32 {check['fp32']:.4f}" in result.output and f"int8 {check['int8']:.4f}" in result.output
    unknown = invoke("export", str(trained_run), "--quantize", "int4")
    assert unknown.exit_code == 2 and "unknown quantization 'int4'" in unknown.output
