"""What a backend is given and what it gives back.

The train recipe hands a backend a TrainJob (read-only: the config, the data, the model to train,
the run directory, where events go) and gets a TrainOutcome back (the weights to keep, the
counts, and the handle that finishes checkpoints still being written). Nothing flows back
through the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftcli.config import Config
from ftcli.data.prepare import Prepared
from ftcli.runs.rundir import RunDir
from ftcli.runtime import Runtime
from ftcli.objective import Objective
from ftcli.training.stopping import StopSignals
from ftcli.training.tracking import Tracker


class TrainingEvents(Protocol):
    """Where training reports its progress for a person to watch (the terminal's progress bar);
    handed in by the command layer, so that training never imports the terminal."""

    def start(self, total_steps: int, initial_step: int = 0) -> None: ...

    def step(self, step: int, samples: int) -> None: ...

    def log(self, event: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...

    def scored(self, outcome: TrainOutcome, metrics: dict[str, dict[str, float]]) -> None:
        """The kept model is saved and scored: its result, shown before the curves are read."""


class NoEvents:
    """Nobody watching: benchmarks, sweeps' quiet trials, other processes than the main one."""

    def start(self, total_steps: int, initial_step: int = 0) -> None:
        pass

    def step(self, step: int, samples: int) -> None:
        pass

    def log(self, event: dict[str, Any]) -> None:
        pass

    def stop(self) -> None:
        pass

    def scored(self, outcome: TrainOutcome, metrics: dict[str, dict[str, float]]) -> None:
        pass


@dataclass(frozen=True)
class TrainJob:
    config: Config
    prepared: Prepared
    model: PreTrainedModel  # the model to train; the trained one comes back in TrainOutcome.model
    tokenizer: PreTrainedTokenizerBase
    run: RunDir
    runtime: Runtime
    objective: Objective
    events: TrainingEvents = field(default_factory=NoEvents)
    resume_from: Path | None = None
    tracker: Tracker = field(default_factory=Tracker)
    # Sees each evaluation event (a sweep's pruner); returning True asks the backend to stop
    # after this evaluation, as early stopping does. Single-process runs only.
    on_evaluate: Callable[[dict[str, Any]], bool] | None = None
    stop_signals: StopSignals = field(default_factory=StopSignals)

    def log(self, event: dict[str, Any]) -> bool:
        """One logging or evaluation event: into metrics.jsonl, onto the progress display and into
        the trackers report_to names. True when on_evaluate asks training to stop."""
        if not self.runtime.is_main:
            return False
        self.run.log_event(event)
        self.events.log(event)
        self.tracker.log(event)
        evaluated = any(key.startswith("eval_") for key in event)
        return bool(evaluated and self.on_evaluate is not None and self.on_evaluate(event))


@dataclass
class TrainOutcome:
    model: PreTrainedModel  # the weights to keep: the best ones when a validation split is configured
    global_step: int
    epoch: float
    train_seconds: float
    train_samples: int
    best_checkpoint: str | None = None
    best_score: float | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # The model FLOPs of the steps trained (training/flops.py), over every process; None: not counted.
    model_flops: int | None = None
    # A backend may return while its last checkpoint is still being written; the recipe calls this
    # (on every process) before the run is complete.
    settle_saves: Callable[[], None] = field(default=lambda: None, repr=False)

    def stats(self) -> dict[str, Any]:
        """metrics.json's train section."""
        seconds = max(self.train_seconds, 1e-9)
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "train_samples": self.train_samples,
            "best_checkpoint": self.best_checkpoint,
            "best_score": self.best_score,
            "stopped_early": self.stopped_early,
            "train_samples_per_second": self.train_samples / seconds,
        } | self._flops(seconds) | self.extra

    def _flops(self, seconds: float) -> dict[str, Any]:
        # Over train_seconds: the loop backend's evaluations and checkpoint saves inside training included.
        if self.model_flops is None:
            return {}
        return {"model_flops": self.model_flops, "achieved_flops_per_second": self.model_flops / seconds}


class Backend(Protocol):
    def check(self, config: Config) -> None:
        """Refuse, before anything is written, what this backend cannot do (a sharded launch, say)."""

    def train(self, job: TrainJob) -> TrainOutcome: ...
