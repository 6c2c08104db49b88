"""Damaged files (cut short by a full disk or an interrupted copy, overwritten with garbage) of every
kind ftcli reads: one line that names the file and what to do, exit code 2, never a traceback;
damage that ftcli can work around (a cache entry, a last log line cut short) is warned about."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import invoke, sentiment_rows, write_rows

from ftcli.errors import FtcliError
from ftcli.fileio import DamagedFile, damaged_file, file_damage
from ftcli.runs.rundir import RunDir

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what was saved\xfe" * 8)


def train_run(root: Path, model: Path, **sections) -> Path:
    """A loop-backend run of 4 steps with checkpoints at steps 2 and 4, evaluated once."""
    experiment = {
        "name": "run", "output_dir": str(root / "runs"), "model": str(model), "backend": "loop",
        "data": {
            "train": str(write_rows(root / "train.jsonl", sentiment_rows(32, seed=1))),
            "validation": str(write_rows(root / "validation.jsonl", sentiment_rows(16, seed=2))),
            "max_length": 32,
        },
        "training": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_every": 2, "save_every": 2, "precision": "fp32"},
        **sections,
    }
    (root / "experiment.yaml").write_text(json.dumps(experiment))
    trained = invoke("train", str(root / "experiment.yaml"))
    assert trained.exit_code == 0, trained.output
    return root / "runs" / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    run = train_run(tmp_path_factory.mktemp("damaged"), tiny_model_dir)
    assert invoke("evaluate", str(run)).exit_code == 0
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def assert_damaged(result, path: Path, *in_hint: str) -> str:
    """Exit code 2 and one line on stderr that names the damaged file; returns that line."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "Traceback" not in result.output and len(message.splitlines()) == 1, message
    assert message.startswith(f"error: {path} is damaged ("), message
    for words in in_hint:
        assert words in message, message
    return message


# ---------------------------------------------------------------- the model a run predicts with


def test_final_weights_cut_short(run):
    """The reported case: model/model.safetensors cut short, for predict and evaluate."""
    cut_short(run / "model" / "model.safetensors")
    resume = f"ftcli train {run} --resume"
    assert_damaged(invoke("predict", str(run), "--text", "a fine film"), run / "model" / "model.safetensors", "(cut short)", resume)
    assert_damaged(invoke("evaluate", str(run)), run / "model" / "model.safetensors", resume)
    # The hint works: a finished run resumed from its last checkpoint writes model/ again.
    assert invoke("train", str(run), "--resume").exit_code == 0
    assert invoke("predict", str(run), "--text", "a fine film").exit_code == 0


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("tokenizer.json", cut_short, "cut short"),
        ("tokenizer_config.json", garbage, "not UTF-8 text"),
        ("config.json", cut_short, "cut short"),
    ],
)
def test_tokenizer_and_config_of_the_model(run, name, damage, reason):
    damage(run / "model" / name)
    assert_damaged(invoke("predict", str(run), "--text", "a fine film"), run / "model" / name, reason, "--resume")


def test_thresholds_and_calibration_beside_the_model(run):
    (run / "model" / "thresholds.json").write_text('{"thresholds": {"negative": 0.5, "positive"')
    assert_damaged(invoke("predict", str(run), "--text", "a fine film"), run / "model" / "thresholds.json", "cut short")
    (run / "model" / "thresholds.json").unlink()
    cut_short(run / "model" / "calibration.json")
    assert_damaged(invoke("evaluate", str(run)), run / "model" / "calibration.json", "cut short", "--resume")


def test_checkpoint_weights_for_checkpoint_option(run):
    garbage(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    result = invoke("predict", str(run), "--text", "a fine film", "--checkpoint", "2")
    assert_damaged(result, run / "checkpoints" / "checkpoint-2" / "model.safetensors", "not safetensors", "--checkpoint checkpoint-4")


def test_adapter_cut_short(tmp_path, tiny_model_dir):
    run = train_run(tmp_path, tiny_model_dir, lora=LORA, calibration="none")
    cut_short(run / "adapter" / "adapter_model.safetensors")
    result = invoke("predict", str(run), "--text", "a fine film", "--adapter")
    assert_damaged(result, run / "adapter" / "adapter_model.safetensors", "cut short", "leave out --adapter")
    assert invoke("predict", str(run), "--text", "a fine film").exit_code == 0  # model/ holds it merged


# ---------------------------------------------------------------- checkpoints a run resumes from


def test_resume_from_a_damaged_checkpoint(run):
    cut_short(run / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    result = invoke("train", str(run), "--resume-from", "checkpoint-4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{run / 'checkpoints' / 'checkpoint-4'} is damaged (optimizer.pt differs from when it was saved)" in result.stderr
    (run / "checkpoints" / "checkpoint-4" / "manifest.json").write_text('{"model.safetensors": {"size": 1')
    result = invoke("train", str(run), "--resume-from", "4")
    assert result.exit_code == 2 and "(manifest.json is cut short)" in result.stderr


def test_resume_passes_over_a_damaged_checkpoint_without_a_manifest(run, caplog):
    """A checkpoint of ftcli before manifests: its files' formats tell that it is damaged."""
    newest = run / "checkpoints" / "checkpoint-4"
    (newest / "manifest.json").unlink()
    cut_short(newest / "rng_state_0.pt")
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        assert invoke("train", str(run), "--resume").exit_code == 0
    assert "checkpoint-4 is damaged (rng_state_0.pt is cut short)" in caplog.text


def test_loading_a_damaged_checkpoint_file_names_it(run):
    """Reads past the manifest check (a checkpoint damaged after it): the file, said in one line."""
    from ftcli.runs.checkpoints import load_torch_file, resume_hint

    path = run / "checkpoints" / "checkpoint-4" / "scheduler.pt"
    cut_short(path)
    with pytest.raises(DamagedFile) as raised, damaged_file(path.parent, resume_hint(path.parent)):
        load_torch_file(path)
    assert raised.value.path == path and raised.value.reason == "cut short"
    assert "--resume-from checkpoint-2" in raised.value.hint


# ---------------------------------------------------------------- the run directory's own files


def test_metrics_json_is_refused_by_report_and_written_anew_by_evaluate(run):
    cut_short(run / "metrics.json")
    assert_damaged(invoke("report", str(run)), run / "metrics.json", "cut short", "--resume")
    assert invoke("evaluate", str(run)).exit_code == 0  # writes it anew, with a warning
    assert "validation" in json.loads((run / "metrics.json").read_text())
    assert invoke("report", str(run)).exit_code == 0


def test_eval_file_cut_short(run):
    cut_short(run / "eval_validation.json")
    assert_damaged(invoke("report", str(run)), run / "eval_validation.json", f"ftcli evaluate {run} --split validation")


def test_metrics_log_with_its_last_line_cut_short_is_read_without_it(run, caplog):
    whole = RunDir(run).read_events()
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 5, "loss": 0.6')  # a crash while appending
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        assert RunDir(run).read_events() == whole
        assert invoke("report", str(run)).exit_code == 0
    assert "cut short" in caplog.text


def test_metrics_log_with_a_damaged_line_before_the_last_is_refused(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:7], *lines[2:]]) + "\n")
    assert_damaged(invoke("report", str(run)), run / "metrics.jsonl", "line 2 is not an event", "delete that line")


def test_env_json_for_the_model_card(run):
    from ftcli.commands.push import model_card
    from ftcli.config import load_config

    cut_short(run / "env.json")
    with pytest.raises(DamagedFile, match="env.json is damaged"):
        model_card(RunDir(run), load_config(run), "user/model")


# ---------------------------------------------------------------- the tokenization cache


def test_damaged_cache_entry_is_tokenized_again(run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))  # this test's own: it damages it
    assert invoke("prepare", str(run)).exit_code == 0
    arrows = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert arrows
    for arrow in arrows:
        cut_short(arrow)
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        assert invoke("prepare", str(run)).exit_code == 0
    assert "tokenization cache" in caplog.text and "damaged" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftcli"):
        assert invoke("prepare", str(run)).exit_code == 0  # the entry rebuilt is whole
    assert "damaged" not in caplog.text


# ---------------------------------------------------------------- the helper itself


def test_file_damage_by_format(tmp_path):
    cases = {
        "cut.json": b'{"a": [0.0, 0.',  # cut inside a number: the parser fails before the end
        "garbled.json": b'{"a": 1} trailing',
        "empty.json": b"",
        "short.safetensors": b"\x10\x00\x00\x00",
        "short.pt": b"PK\x03\x04 and no directory",
        "other.pt": b"GIF89a",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    found = {name: file_damage(tmp_path / name) for name in cases}
    assert found == {
        "cut.json": "cut short",
        "garbled.json": "not valid JSON at line 1 column 10",
        "empty.json": "empty",
        "short.safetensors": "cut short",
        "short.pt": "cut short",
        "other.pt": "not a file torch.save wrote",
    }
    (tmp_path / "whole.json").write_text("{}")
    assert file_damage(tmp_path / "whole.json") is None and file_damage(tmp_path / "missing.json") is None


def test_errors_that_are_not_damage_pass_as_they_were(trained):
    """A library's error in a folder whose files are whole (a wrong dtype, memory) is not called damage."""
    with pytest.raises(RuntimeError, match="expected scalar type"), damaged_file(trained / "model", "unused"):
        raise RuntimeError("expected scalar type Float but found Half")
    with pytest.raises(FtcliError, match="other") as raised, damaged_file(trained / "model", "unused"):
        raise FtcliError("other")
    assert not isinstance(raised.value, DamagedFile)
