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

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import FtcliError

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key)", re.IGNORECASE)

log = logging.getLogger("ftcli")


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(staging, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


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
        cls.check_can_create(path, overwrite)
        run = cls(path)
        if run.path.exists():
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True)
        return run

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
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory while training into it: a second `ftcli train` is refused, not
        interleaved. A lock left by a process that died on this host (kill -9) is taken over."""
        self._refuse_if_locked()
        if self.lock_file.exists():
            log.warning("taking over the lock of %s left by a process that no longer runs", self.path)
        mine = f"{os.getpid()} {socket.gethostname()}"
        atomic_write_text(self.lock_file, mine + "\n")
        try:
            yield
        finally:
            # A process that took over a lock it judged stale (it is not) must not delete its lock.
            if self.lock_file.is_file() and self.lock_file.read_text().strip() == mine:
                self.lock_file.unlink()

    def _refuse_if_locked(self) -> None:
        try:
            pid_text, host = self.lock_file.read_text().split()
        except (OSError, ValueError):
            return  # no lock, or not one ftcli wrote: nothing holds the run
        pid = int(pid_text)
        if host == socket.gethostname() and not _process_alive(pid):
            return
        where = "" if host == socket.gethostname() else f" on {host}"
        raise FtcliError(
            f"run directory {self.path} is in use by process {pid}{where}",
            f"wait for it or stop it, or train under another name; delete {self.lock_file} if no such process runs",
        )

    # ------------------------------------------------------------ contents
    def write_env(self, device: str, precision: str) -> None:
        atomic_write_json(self.env_file, environment(device, precision))

    def log_event(self, event: dict[str, Any]) -> None:
        """Append one logging or evaluation event to metrics.jsonl (flushed, so a crash keeps it)."""
        with self.metrics_log.open("a", encoding="utf-8") as file:
            file.write(json.dumps(event) + "\n")

    def drop_events_after(self, step: int) -> None:
        """Forget the events logged after `step`: a run resumed from there logs them again."""
        kept = [event for event in self.read_events() if event.get("step", 0) <= step]
        atomic_write_text(self.metrics_log, "".join(json.dumps(event) + "\n" for event in kept))

    def read_events(self) -> list[dict[str, Any]]:
        if not self.metrics_log.is_file():
            return []
        lines = self.metrics_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else {}

    def update_metrics(self, split: str, values: dict[str, Any]) -> None:
        metrics = self.read_metrics()
        metrics[split] = values
        atomic_write_json(self.metrics_file, metrics)

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
