"""A full disk is a user error wherever ftcli writes: one line that says so, where, and how much the
write needed; exit code 2, no traceback; the last whole checkpoint whole and nothing half-written.

Training runs fill a real 4 MB tmpfs (mounted here; skipped where mounting is not permitted): a
checkpoint of the tiny model is 2.3 MB in either backend (weights 0.7 MB, AdamW state 1.5 MB,
tokenizer 0.1 MB), so the first fits and the second runs out of space in the optimizer's
torch.save, whose zip writer reports it without the OS's reason. The other write sites are made to
fail with ENOSPC at the lowest level they write through."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import invoke, sentiment_rows

from ftcli import fileio
from ftcli.commands.predict import write_predictions
from ftcli.fileio import DiskFull, disk_full
from ftcli.modeling import save_model
from ftcli.runs import checkpoints
from ftcli.runs.rundir import RunDir
from ftcli.training.loop import checkpointing

DISK = "4m"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
_mounts = itertools.count()


@pytest.fixture
def small_disk(tmp_path):
    """A fresh 4 MB tmpfs, unmounted afterwards whatever happened."""
    folder = tmp_path / f"disk{next(_mounts)}"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a real full disk needs a tmpfs mount, not permitted here: {mounted.stderr.strip()}")
    yield folder
    if subprocess.run(["umount", str(folder)]).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def experiment_on(make_experiment, disk: Path, backend: str) -> Path:
    return make_experiment(
        backend=backend, train_size=64, output_dir=str(disk), training={"max_steps": 6, "eval_every": 2, "save_every": 2}
    )


def assert_one_line_about_checkpoint_4(output: str, run: RunDir) -> None:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    line = " ".join(output[output.index("error:") :].split())  # rich may wrap the line on a narrow terminal
    assert "no space left on device while saving checkpoint-4; checkpoint-2 is intact" in line
    assert f"{run.checkpoints} (filesystem {run.path.parent})" in line  # where
    needed = fileio.format_bytes(fileio.tree_bytes(run.checkpoint_dir(2)))
    assert f"about {needed} needed" in line and f"ftcli train {run.path} --resume" in line
    assert [path.name for path in run.list_checkpoints()] == ["checkpoint-2"]
    assert checkpoints.damage(run.checkpoint_dir(2)) is None
    assert not (run.checkpoints / ".partial").exists() and not run.lock_file.exists()


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_checkpoint_that_fills_a_real_disk_is_one_line_and_leaves_the_last_one_whole(
    backend, make_experiment, small_disk, tmp_path, monkeypatch
):
    # Past the check before saving (which would refuse): the write itself runs out of space.
    monkeypatch.setattr(checkpoints, "refuse_without_room", lambda *args: None)
    monkeypatch.setattr(checkpointing, "refuse_without_room", lambda *args: None)
    result = invoke("train", str(experiment_on(make_experiment, small_disk, backend)))
    assert result.exit_code == 2, result.output
    run = RunDir(small_disk / "tiny")
    assert_one_line_about_checkpoint_4(result.output, run)
    if backend == "loop":  # moved to a larger disk, the run continues from checkpoint-2
        copy = Path(shutil.copytree(run.path, tmp_path / "larger" / "tiny"))
        resumed = invoke("train", str(copy), "--resume")
        assert resumed.exit_code == 0, resumed.output
        trained = json.loads(RunDir(copy).metrics_file.read_text())["train"]
        assert trained["global_step"] == 6 and trained["resumed_from"] == str(copy / "checkpoints" / "checkpoint-2")


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_written(make_experiment, small_disk, monkeypatch):
    saved = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda value, path, *args, **kwargs: saved.append(str(path)) or save(value, path, *args, **kwargs))
    result = invoke("train", str(experiment_on(make_experiment, small_disk, "loop")))
    assert result.exit_code == 2, result.output
    assert_one_line_about_checkpoint_4(result.output, RunDir(small_disk / "tiny"))
    assert saved and not [path for path in saved if "checkpoint-4" in path]  # not a byte of it written


def test_the_final_model_save_on_a_full_disk_leaves_model_as_it_was(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, modeling_utils

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    target = tmp_path / "run" / "model"
    save_model(model, tokenizer, target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}

    def half_then_full(tensors, filename, *args, **kwargs):  # safetensors' writer, as a full disk stops it
        Path(filename).write_bytes(b"\0" * 1000)
        raise ENOSPC

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_then_full)
    with pytest.raises(DiskFull) as raised:
        save_model(model, tokenizer, target)
    assert f"no space left on device writing {target}: {target.parent} (filesystem " in str(raised.value)
    needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    assert f"about {fileio.format_bytes(needed)} needed" in str(raised.value)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert sorted(path.name for path in target.parent.iterdir()) == ["model"]  # no staging folder left


def test_a_predictions_file_on_a_full_disk_is_one_line_naming_it(tmp_path, monkeypatch):
    output = tmp_path / "out" / "predictions.jsonl"
    rows = [{"text": row["text"], "label": row["label"]} for row in sentiment_rows(4)]

    def full(handle):  # where a full disk shows on NFS and delayed allocation: the data reaches no block
        raise ENOSPC

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=f"no space left on device writing {output}: {output.parent} .* bytes needed"):
        write_predictions(rows, output)
    assert list(output.parent.iterdir()) == []  # neither the file nor its staging copy


def test_an_event_that_does_not_fit_leaves_metrics_jsonl_without_half_a_line(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.log_event({"step": 1, "train_loss": 0.5})
    write = os.write
    calls = []

    def half_then_full(handle, data):  # the kernel takes what fits, then refuses the rest
        calls.append(len(data))
        if len(calls) == 1:
            return write(handle, bytes(data[: len(data) // 2]))
        raise ENOSPC

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match=f"no space left on device writing {run.metrics_log}"):
        run.log_event({"step": 2, "train_loss": 0.25})
    assert len(calls) == 2
    assert run.read_events() == [{"step": 1, "train_loss": 0.5}]


def test_files_written_whole_on_a_real_full_disk(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * fileio.free_bytes(small_disk))
    run = RunDir(small_disk)
    with pytest.raises(DiskFull) as raised:
        run.log_event({"step": 1})
    assert str(raised.value).startswith(f"no space left on device writing {run.metrics_log}: {small_disk} (filesystem {small_disk}) has ")
    with pytest.raises(DiskFull, match="report.html"):
        fileio.atomic_write_text(small_disk / "report.html", "<html>" + "x" * 10_000)
    assert run.read_events() == [] and not list(small_disk.glob(".report.html*"))  # no staging copy left


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9024 vs 8918")
    usage = shutil.disk_usage(tmp_path)
    assert not disk_full(short_write, tmp_path) and not disk_full(RuntimeError("boom"), tmp_path)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert disk_full(wrapped) and disk_full(RuntimeError(f"write: {os.strerror(errno.ENOSPC)}"))
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage._replace(free=4096))
    assert disk_full(short_write, tmp_path) and not disk_full(short_write)  # torch's words count on a full disk only
