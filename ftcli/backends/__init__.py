"""Backends share one small interface: take a TrainJob, train its model in place, return a TrainOutcome.

When a backend returns, job.model holds the weights to keep (the best ones when a validation split
is configured); the train recipe saves them, evaluates them and writes the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftcli.config import Config
from ftcli.data import Prepared
from ftcli.errors import FtcliError
from ftcli.rundir import RunDir
from ftcli.tracking import Tracker
from ftcli.ui import TrainingProgress


@dataclass
class TrainJob:
    config: Config
    prepared: Prepared
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    run: RunDir
    progress: TrainingProgress
    resume_from: Path | None = None
    is_main_process: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    # Sees each evaluation event (a sweep's pruner); returning True asks the backend to stop
    # after this evaluation, as early stopping does. Single-process runs only.
    on_evaluate: Callable[[dict[str, Any]], bool] | None = None
    stop_requested: bool = False

    def log(self, event: dict[str, Any]) -> None:
        """One logging or evaluation event: into metrics.jsonl, onto the progress bar and into
        the trackers report_to names."""
        if self.is_main_process:
            self.run.log_event(event)
            self.progress.log(event)
            self.tracker.log(event)
            if self.on_evaluate is not None and any(key.startswith("eval_") for key in event):
                self.stop_requested = self.on_evaluate(event) or self.stop_requested


@dataclass
class TrainOutcome:
    global_step: int
    epoch: float
    train_seconds: float
    train_samples: int
    best_checkpoint: str | None = None
    best_score: float | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    def train(self, job: TrainJob) -> TrainOutcome: ...


def get_backend(name: str) -> Backend:
    if name == "trainer":
        from ftcli.backends.trainer import TrainerBackend

        return TrainerBackend()
    if name == "loop":
        from ftcli.backends.loop import LoopBackend

        return LoopBackend()
    raise FtcliError(f"unknown backend '{name}'", "use trainer or loop")
