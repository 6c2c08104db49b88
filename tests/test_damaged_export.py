"""A damaged ONNX export (a copy cut short, a file overwritten) is found before it is used:
predict --engine auto warns in one line and predicts with torch, --engine onnx and serve --engine
onnx refuse it in one line (exit 2), also for exports whose report records no file stamps."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from conftest import invoke, sentiment_rows, write_rows

from ftcli.fileio import file_sha256

TEXT = ("--text", "a lovely film with a dreadful ending")


@pytest.fixture(scope="module")
def exported_run(tiny_model_dir, tmp_path_factory):
    """One trained run exported with an int8 model beside the fp32 one (kept whatever its metric)."""
    root = tmp_path_factory.mktemp("damaged-export")
    experiment = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "model": str(tiny_model_dir),
        "data": {
            "train": str(write_rows(root / "train.jsonl", sentiment_rows(32, seed=1))),
            "validation": str(write_rows(root / "validation.jsonl", sentiment_rows(16, seed=2))),
            "max_length": 32,
        },
        "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "precision": "fp32"},
        "metrics": ["accuracy"],
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    with pytest.MonkeyPatch.context() as patch:  # the autouse isolated_cache is per test
        patch.setenv("FTCLI_CACHE", str(tmp_path_factory.getbasetemp() / "ftcli-cache"))
        assert (trained := invoke("train", str(root / "experiment.yaml"))).exit_code == 0, trained.output
        exported = invoke("export", str(root / "runs" / "tiny"), "--quantize", "int8", "--max-drop", "1")
        assert exported.exit_code == 0, exported.output
    return root / "runs" / "tiny"


@pytest.fixture
def run(exported_run, tmp_path):
    """A copy of the exported run for one test to damage (copytree keeps mtimes: the export stays current)."""
    return shutil.copytree(exported_run, tmp_path / "tiny")


def _torch_predictions(run) -> str:
    result = invoke("predict", str(run), *TEXT, "--engine", "torch")
    assert result.exit_code == 0 and not result.stderr, result.output
    return result.stdout


def _assert_auto_falls_back(run, damaged_file: str, why: str) -> None:
    """auto: one warning naming the file and the fix, and exactly what the torch engine predicts."""
    result = invoke("predict", str(run), *TEXT)
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {run / 'export' / damaged_file} is damaged")
    assert why in warning and f"ftcli export {run}` again" in warning
    assert result.stdout == _torch_predictions(run)


def _assert_refused(result, damaged_file: str, why: str) -> None:
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and f"export/{damaged_file} is damaged" in line and why in line, line
    assert "ftcli export" in line and "serving" not in result.stdout


def test_export_records_each_files_size_and_sha256(run):
    report = json.loads((run / "export" / "report.json").read_text())
    files = report["files"]
    names = {path.name for path in (run / "export").iterdir()} - {"report.json"}
    assert set(files) == names and {"model.onnx", "model.int8.onnx", "tokenizer.json"} <= names
    assert not any(name.endswith(".data") for name in names)  # below 2 GB the graph keeps its weights
    for name, stamp in files.items():
        assert stamp["bytes"] == (run / "export" / name).stat().st_size
        assert stamp["sha256"] == file_sha256(run / "export" / name)


def test_a_cut_model_onnx_falls_back_to_torch_and_is_refused_by_the_onnx_engine(run):
    model = run / "export" / "model.onnx"
    os.truncate(model, model.stat().st_size // 2)
    size = f"{model.stat().st_size} bytes where ftcli export wrote"
    _assert_auto_falls_back(run, "model.onnx", size)
    _assert_refused(invoke("predict", str(run), *TEXT, "--engine", "onnx"), "model.onnx", size)
    _assert_refused(invoke("serve", str(run), "--engine", "onnx", "--port", "0"), "model.onnx", size)


def test_a_model_onnx_of_garbage_of_the_same_size_is_damaged(run):
    model = run / "export" / "model.onnx"
    model.write_bytes(os.urandom(model.stat().st_size))
    _assert_auto_falls_back(run, "model.onnx", "its ends_sha256 is not the one ftcli export recorded")
    _assert_refused(invoke("predict", str(run), *TEXT, "--engine", "onnx"), "model.onnx", "ends_sha256")


def test_the_server_hashes_the_whole_model(run):
    """A change in the middle that the ends' digest does not see: the server's whole sha256 does."""
    model = run / "export" / "model.onnx"
    middle = model.stat().st_size // 2
    with model.open("r+b") as handle:
        handle.seek(middle)
        byte = handle.read(1)
        handle.seek(middle)
        handle.write(bytes([byte[0] ^ 0xFF]))
    _assert_refused(invoke("serve", str(run), "--engine", "onnx", "--port", "0"), "model.onnx", "its sha256 is not")


def test_a_cut_int8_model_is_refused_by_the_server_and_leaves_predict_alone(run):
    int8 = run / "export" / "model.int8.onnx"
    os.truncate(int8, 100)
    served = invoke("serve", str(run), "--engine", "onnx", "--quantized", "--port", "0")
    _assert_refused(served, "model.int8.onnx", "100 bytes where ftcli export wrote")
    onnx = invoke("predict", str(run), *TEXT, "--engine", "onnx")  # predict reads the fp32 model only
    assert onnx.exit_code == 0 and not onnx.stderr, onnx.output


def test_a_cut_tokenizer_in_the_export_falls_back_to_torch(run):
    tokenizer = run / "export" / "tokenizer.json"
    os.truncate(tokenizer, tokenizer.stat().st_size - 10)
    _assert_auto_falls_back(run, "tokenizer.json", "bytes where ftcli export wrote")
    _assert_refused(invoke("predict", str(run), *TEXT, "--engine", "onnx"), "tokenizer.json", "bytes where")


def test_an_export_without_file_stamps_still_turns_load_failures_into_one_line(run):
    """An export of an older ftcli records no stamps: what onnxruntime or tokenizers cannot read is
    still damage, found when loaded."""
    report_file = run / "export" / "report.json"
    report = json.loads(report_file.read_text())
    del report["files"]
    report_file.write_text(json.dumps(report))
    assert invoke("predict", str(run), *TEXT, "--engine", "onnx").exit_code == 0  # whole, it is used

    tokenizer = run / "export" / "tokenizer.json"
    original = tokenizer.read_bytes()
    os.truncate(tokenizer, len(original) // 2)
    _assert_auto_falls_back(run, "tokenizer.json", "tokenizers cannot read it")
    tokenizer.write_bytes(original)

    model = run / "export" / "model.onnx"
    os.truncate(model, model.stat().st_size // 2)
    _assert_auto_falls_back(run, "model.onnx", "onnxruntime cannot load it")
    _assert_refused(invoke("predict", str(run), *TEXT, "--engine", "onnx"), "model.onnx", "onnxruntime cannot load it")
    _assert_refused(invoke("serve", str(run), "--engine", "onnx", "--port", "0"), "model.onnx", "onnxruntime cannot load")


def test_a_cut_report_is_damage_too(run):
    report = run / "export" / "report.json"
    os.truncate(report, report.stat().st_size // 2)
    _assert_auto_falls_back(run, "report.json", "not JSON")
    _assert_refused(invoke("predict", str(run), *TEXT, "--engine", "onnx"), "report.json", "not JSON")
