"""The train command: check the Hub first when the run is to be pushed, train (the recipe), read
the saved run's curves while its last checkpoint is written, then push."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from ftcli.commands.push import check_hub_access, push_run
from ftcli.config import Config
from ftcli.runs.rundir import RunDir
from ftcli.runtime import Runtime
from ftcli.training.job import TrainingEvents
from ftcli.training.recipe import TrainResult, train

if TYPE_CHECKING:
    from ftcli.reporting.diagnosis import Diagnosis


@dataclass
class TrainedRun:
    result: TrainResult
    diagnosis: Diagnosis | None  # the learning curves read; None for a run too short to log anything
    pushed_to: str | None = None  # the Hub commit, when push_to_hub is set


def train_run(
    config: Config,
    overwrite: bool = False,
    resume: bool | Literal["auto"] = False,
    resume_from: str | Path | None = None,
    events: TrainingEvents | None = None,
    on_evaluate: Callable[[dict[str, Any]], bool] | None = None,
    runtime: Runtime | None = None,
) -> TrainedRun:
    """`ftcli train`: the run trained, its curves drawn and diagnosed, and pushed when asked."""
    runtime = runtime or Runtime.resolve(config.training.precision, distributed=True)
    if config.push_to_hub:
        check_hub_access()  # before hours of training, not after
    result = train(config, overwrite, resume, resume_from, events, on_evaluate, analyze=read_curves, runtime=runtime)
    pushed_to = push_run(result.run, config.push_to_hub) if config.push_to_hub and runtime.is_main else None
    return TrainedRun(result, result.analysis, pushed_to)


def read_curves(run: RunDir) -> Diagnosis | None:
    """curves.png and diagnosis.json, from the run's events; a run shorter than logging_steps,
    without validation, has none to read."""
    from ftcli.reporting.report import analyze_run  # matplotlib: imported once there are curves to draw

    return analyze_run(run).diagnosis if run.read_events() else None
