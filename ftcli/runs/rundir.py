"""The run directory: every path inside it, and writes that never leave a half file behind.

    output_dir/name/
      config.yaml      resolved config          env.json       versions, device, git, command
      metrics.jsonl    one event per log/eval   metrics.json   final metrics per split
      checkpoints/checkpoint-<step>/            model/         final (best) model + tokenizer
      adapter/         LoRA adapters + head (LoRA runs; model/ holds them merged)
      export/          model.onnx + tokenizer, written by `ftcli export`
      .lock            "pid hostname" of the `ftcli train` writing the run, while it does
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import FtcliError
from ftcli.fileio import DamagedFile, append_whole, atomic_write_json, atomic_write_text, read_json

# Beside a model's weights (model/, a checkpoint, export/), read by evaluate, predict, export and
# serving: the decision thresholds (multi_label's per label, a two-class run's when set) and the
# calibrating temperature.
THRESHOLDS_FILE = "thresholds.json"
CALIBRATION_FILE = "calibration.json"
WEIGHTS_FILE = "model.safetensors"  # as save_pretrained writes a model's weights
# In export/, as ftcli export writes it: the fp32 graph, the int8 one (kept when its metric holds),
# and the report (the parity check, the weights of model/ it was exported from and each file's size
# and digests, checked before the export is used: onnx_predict.check_export_files).
ONNX_FILE, INT8_FILE, EXPORT_REPORT_FILE = "model.onnx", "model.int8.onnx", "report.json"
# A distilled student run's gate (ftcli distill): it and its teacher scored, sized and timed.
GATE_FILE = "distill.json"

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key)", re.IGNORECASE)

log = logging.getLogger("ftcli")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------ layout
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env_file(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def curves_png(self) -> Path:
        return self.path / "curves.png"

    @property
    def diagnosis_file(self) -> Path:
        return self.path / "diagnosis.json"

    @property
    def calibration_png(self) -> Path:
        return self.path / "calibration.png"

    @property
    def gate_file(self) -> Path:
        return self.path / GATE_FILE

    def eval_files(self) -> list[Path]:
        """The eval_<split>.json files ftcli evaluate wrote for the final model."""
        return sorted(self.path.glob("eval_*.json"))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def eval_file(self, split: str, checkpoint: Path | None = None) -> Path:
        return (checkpoint or self.path) / f"eval_{split}.json"

    @staticmethod
    def checkpoint_step(checkpoint: Path) -> int:
        return int(checkpoint.name.split("-")[1])

    def find_checkpoint(self, reference: str | Path) -> Path:
        """Where a checkpoint given by step, by name inside this run, or by path would be (it may not exist)."""
        if str(reference).isdigit():
            return self.checkpoint_dir(int(reference))
        path = Path(reference)
        if not path.exists() and (self.checkpoints / path).exists():
            return self.checkpoints / path
        return path

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of an interrupted save are skipped)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
        return sorted(found, key=self.checkpoint_step)

    # ------------------------------------------------------------ life cycle
    @classmethod
    def check_can_create(cls, path: str | Path, overwrite: bool = False) -> None:
        """Raise unless `create` may make a run directory at path (or, with overwrite, replace the run
        there); touches nothing, so a train command can ask before it spends time tokenizing."""
        run = cls(path)
        blocker = next((parent for parent in (run.path, *run.path.parents) if parent.exists()), None)
        if blocker is not None and blocker != run.path and not blocker.is_dir():
            raise FtcliError(
                f"run directory {run.path} cannot be created: {blocker} is a file", "change output_dir to a folder"
            )
        if run.path.exists() and not run.path.is_dir():
            raise FtcliError(f"run directory {run.path} is a file", "remove it or change name/output_dir")
        if run.path.exists() and any(run.path.iterdir()):
            run._refuse_if_locked()  # before --overwrite deletes the files of a run in progress
            if not overwrite:
                raise FtcliError(
                    f"run directory {run.path} already exists",
                    "pass --overwrite to replace it, or change name (or --set name=...)",
                )
            if not run.config_file.is_file():
                raise FtcliError(
                    f"{run.path} is not an ftcli run directory (no config.yaml), refusing to overwrite it",
                    "change name or output_dir",
                )

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> RunDir:
        """A fresh run directory; an existing one is replaced only with overwrite, and only if it is a run."""
        with cls.claim(path, overwrite) as run:
            run.clear()
        return run

    @classmethod
    @contextmanager
    def claim(cls, path: str | Path, overwrite: bool = False) -> Iterator[RunDir]:
        """Hold the place of a new run: the directory exists (created if absent) and is locked while
        inside. An old run there (overwrite) is deleted only by `clear`, under the lock, so that two
        `ftcli train --overwrite` never delete the same run at once. An error before anything is
        written leaves the place as it was found: an old run intact, a directory made here removed."""
        cls.check_can_create(path, overwrite)
        run = cls(path)
        made = not run.path.exists()
        with _os_errors(run.path, "create"):
            run.path.mkdir(parents=True, exist_ok=True)
        try:
            with run.lock():
                yield run
        except BaseException:
            if made and run.path.is_dir() and not any(run.path.iterdir()):
                run.path.rmdir()
            raise

    def clear(self) -> None:
        """Delete everything in the run directory but its lock: the start of a fresh run."""
        for entry in self.path.iterdir():
            if entry != self.lock_file:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run, for evaluate, predict and report."""
        run = cls(path)
        if not run.path.is_dir():
            what = "is a file" if run.path.exists() else "does not exist"
            raise FtcliError(f"run directory {run.path} {what}", "give the folder a train command created")
        if not run.config_file.is_file():
            raise FtcliError(f"{run.path} is not an ftcli run directory (no config.yaml)", "give a run directory")
        return run

    # ------------------------------------------------------------ one writer at a time
    def lock(self) -> RunLock:
        """Hold the run directory while training into it: a second `ftcli train` is refused, not
        interleaved. A lock left by a process that died on this host (kill -9) is taken over."""
        return RunLock(self)

    def _refuse_if_locked(self) -> None:
        holder = _lock_holder(self.lock_file)
        if holder is not None:
            raise _in_use(self, *holder)

    # ------------------------------------------------------------ contents
    def write_env(self, device: str, precision: str, precision_reason: str = "", **notes: Any) -> None:
        """env.json: environment() and what the run chose (`notes`: the pad token, the attention,
        gradient checkpointing), each with its reason; an empty note is left out."""
        record = environment(device, precision) | {"precision_reason": precision_reason} | notes
        atomic_write_json(self.env_file, {key: value for key, value in record.items() if value != ""})

    def log_event(self, event: dict[str, Any]) -> None:
        """Append one logging or evaluation event to metrics.jsonl (flushed, so a crash keeps it)."""
        append_whole(self.metrics_log, (json.dumps(event) + "\n").encode("utf-8"))

    def drop_events_after(self, step: int) -> None:
        """Forget the events logged after `step`: a run resumed from there logs them again."""
        kept = [event for event in self.read_events() if event.get("step", 0) <= step]
        atomic_write_text(self.metrics_log, "".join(json.dumps(event) + "\n" for event in kept))

    def read_events(self) -> list[dict[str, Any]]:
        """The logged events. A last line cut short (a crash while appending) is left out with a
        warning: the events before it are good. A damaged line before the last is refused."""
        if not self.metrics_log.is_file():
            return []
        lines = [line for line in self.metrics_log.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]
        events = [_event(line) for line in lines]
        for number, event in enumerate(events, start=1):
            if event is None and number < len(events):
                raise DamagedFile(
                    self.metrics_log, f"line {number} is not an event", "restore it from a backup, or delete that line"
                )
        if events and events[-1] is None:
            log.warning("%s ends in an event cut short (a crash while logging it); reading the events before it", self.metrics_log)
            events.pop()
        return events

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file, self.repair_hint) if self.metrics_file.is_file() else {}

    def update_metrics(self, split: str, values: dict[str, Any]) -> None:
        try:
            metrics = self.read_metrics()
        except DamagedFile as error:  # about to be written anew: what it held is lost either way
            log.warning("%s; writing it anew with the %s metrics", error.message, split)
            metrics = {}
        metrics[split] = values
        atomic_write_json(self.metrics_file, metrics)

    def weights_stamp(self) -> dict[str, Any] | None:
        """model/'s weights file, its size and modification time (None without one): what an export
        records, so that prediction later knows whether the export is still of these weights."""
        path = self.model_dir / WEIGHTS_FILE
        if not path.is_file():
            return None
        stat = path.stat()
        return {"file": WEIGHTS_FILE, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def require_model(self, checkpoint: str | Path | None = None) -> Path:
        """The model folder to load: the final model, or a given checkpoint (path or step)."""
        path = self.model_dir if checkpoint is None else self.find_checkpoint(checkpoint)
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            hint = (
                "train it to the end first, or pass --checkpoint"
                if checkpoint is None
                else f"available: {', '.join(p.name for p in self.list_checkpoints()) or 'none'}"
            )
            raise FtcliError(f"no model in {path}", hint)
        return path

    def repair_hint(self, damaged: Path) -> str:
        """What to do about a damaged file of this run for evaluate, predict and report: the
        command that writes it again, else a backup."""
        with_checkpoints = self.list_checkpoints()
        if damaged.parent == self.model_dir or damaged == self.metrics_file:
            if with_checkpoints:  # a resumed run that has finished saves the final model and its metrics again
                return f"restore it from a backup, or write it again from the last checkpoint: ftcli train {self.path} --resume"
            return f"restore it from a backup, or train the run again: ftcli train {self.path} --overwrite"
        if damaged.parent.parent == self.checkpoints:
            choices = [f"--checkpoint {path.name}" for path in with_checkpoints if path != damaged.parent][-1:]
            if (self.model_dir / "config.json").is_file():
                choices.append("the final model (leave out --checkpoint)")
            return "restore it from a backup" + (f", or use {' or '.join(choices)}" if choices else "")
        if damaged.parent == self.adapter_dir:
            return "restore it from a backup, or leave out --adapter: model/ holds the adapter merged into the model"
        if damaged == self.env_file:
            return "restore it from a backup, or delete it: it records only what the run was trained with (versions, device)"
        if damaged.name.startswith("eval_") and damaged.parent == self.path:
            return f"score the split again: ftcli evaluate {self.path} --split {damaged.stem.removeprefix('eval_')}"
        return "restore it from a backup"


def _event(line: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl as an event; None when it is not one (cut short, garbled)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


class RunLock:
    """The lock file holds "pid hostname" of its holder, who also holds an advisory lock (flock) on
    it: the kernel releases that when the holder dies, even by kill -9, and it makes taking the lock
    atomic, so that of two processes that find it free at once only one gets it."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._handle: int | None = None
        self._mine = f"{os.getpid()} {socket.gethostname()}"

    def __enter__(self) -> RunLock:
        path = self.run.lock_file
        while True:
            with _os_errors(self.run.path, "lock"):
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse_holder(_read_handle(handle))
                os.close(handle)
                raise _in_use(self.run, *(holder or ("another process", socket.gethostname()))) from None
            if _same_file(handle, path):
                break
            os.close(handle)  # its holder removed it between our open and our lock: open the new one
        previous = _read_handle(handle)
        holder = _lock_holder_from(previous)
        if holder is not None:  # a lock taken without flock: by ftcli before 2026-12, or on another host
            os.close(handle)
            raise _in_use(self.run, *holder)
        if previous.strip():
            log.warning("taking over the lock of %s left by a process that no longer runs", self.run.path)
        os.ftruncate(handle, 0)
        os.pwrite(handle, (self._mine + "\n").encode(), 0)
        os.fsync(handle)
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is None:
            return
        # Removed while still held, so that no one locks a file that is about to vanish.
        if _read_handle(self._handle).strip() == self._mine:
            self.run.lock_file.unlink(missing_ok=True)
        os.close(self._handle)
        self._handle = None


def _read_handle(handle: int) -> str:
    return os.pread(handle, 4096, 0).decode("utf-8", errors="replace")


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.fstat(handle).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _parse_holder(text: str) -> tuple[int, str] | None:
    try:
        pid_text, host = text.split()
        return int(pid_text), host
    except ValueError:
        return None  # empty, or not written by ftcli


def _lock_holder(lock_file: Path) -> tuple[int, str] | None:
    """Who holds the run, when someone does: a live process on this host, or one on another host."""
    try:
        text = lock_file.read_text()
    except OSError:
        return None
    if not text.strip():
        return None
    try:
        with lock_file.open("rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _parse_holder(text) or (0, socket.gethostname())
    except OSError:
        return None
    return _lock_holder_from(text)


def _lock_holder_from(text: str) -> tuple[int, str] | None:
    """The holder a lock file names, unless it is a process that no longer runs on this host."""
    holder = _parse_holder(text)
    if holder is None:
        return None
    pid, host = holder
    if host == socket.gethostname() and not _process_alive(pid):
        return None
    return holder


def _in_use(run: RunDir, pid: int | str, host: str) -> FtcliError:
    where = "" if host == socket.gethostname() else f" on {host}"
    return FtcliError(
        f"run directory {run.path} is in use by process {pid}{where}",
        f"wait for it or stop it, or train under another name; delete {run.lock_file} if no such process runs",
    )


@contextmanager
def _os_errors(path: Path, action: str) -> Iterator[None]:
    """The file system's refusals (permissions, a name too long, a read-only disk) as one line."""
    try:
        yield
    except OSError as error:
        raise FtcliError(
            f"cannot {action} run directory {path}: {error.strerror or error}", "change output_dir or name"
        ) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def environment(device: str, precision: str) -> dict[str, Any]:
    """What produced a run: versions, device and precision, git commit, and the command line with secrets masked."""
    import accelerate
    import datasets
    import torch
    import transformers

    import ftcli

    return {
        "ftcli": ftcli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "device": device,
        "precision": precision,
        "git_commit": _git_commit(),
        "command": mask_secrets(sys.argv),
    }


def mask_secrets(argv: list[str]) -> list[str]:
    masked, hide_next = [], False
    for arg in argv:
        if hide_next:
            masked.append("***")
            hide_next = False
        elif "=" in arg and SECRET_PATTERN.search(arg.split("=", 1)[0]):
            masked.append(arg.split("=", 1)[0] + "=***")
        else:
            masked.append(arg)
            hide_next = arg.startswith("--") and bool(SECRET_PATTERN.search(arg))
    return masked


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
