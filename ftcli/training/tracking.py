"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each optional and off by default.

metrics.jsonl stays the record of a run; a tracker mirrors the same events for people who
already watch their runs in one. Both backends log through TrainJob.log, so both get them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Protocol

from ftcli.config import Config
from ftcli.errors import FtcliError
from ftcli.runs.rundir import RunDir

# report_to name -> the module it needs (also the name of ftcli's optional extra).
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"  # inside the run directory: `tensorboard --logdir runs/` finds every run


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Fans each event out to the trackers report_to names; with none, it does nothing."""

    def __init__(self, names: list[str] | None = None) -> None:
        """Checks that every named tracker is installed, so a missing one fails before training."""
        self.names = list(names or [])
        for name in self.names:
            if importlib.util.find_spec(MODULES[name]) is None:
                raise FtcliError(
                    f"report_to names {name}, which is not installed",
                    f"pip install 'ftcli[{name}]', or remove it from report_to",
                )
        self._sinks: list[Sink] = []

    def start(self, run: RunDir, config: Config) -> None:
        self._sinks = [_open(name, run, config) for name in self.names]

    def log(self, event: dict[str, Any]) -> None:
        values = tracker_scalars(event)
        for sink in self._sinks:
            sink.log(values, int(event["step"]))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def tracker_scalars(event: dict[str, Any]) -> dict[str, float]:
    """metrics.jsonl keys as tracker tags, grouped so dashboards show train/ and eval/ sections."""
    values = {}
    for key, value in event.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):
            values[f"eval/{key[5:]}"] = float(value)
        else:
            values[f"train/{key.removeprefix('train_')}"] = float(value)
    return values


def _open(name: str, run: RunDir, config: Config) -> Sink:
    opener = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[name]
    try:
        return opener(run, config)
    except Exception as error:  # each library fails in its own way (no login, unreachable server)
        raise FtcliError(f"report_to {name} could not start: {error}", f"fix its setup, or remove {name} from report_to") from None


class _TensorBoard:
    def __init__(self, run: RunDir, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.path / TENSORBOARD_DIR))
        self.writer.add_text("config", f"```yaml\n{run.config_file.read_text(encoding='utf-8')}\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run: RunDir, config: Config) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ftcli"),
            name=config.name,
            dir=str(run.path.resolve()),  # W&B wants an absolute path
            config=config.model_dump(mode="json"),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run: RunDir, config: Config) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=config.name)
        mlflow.log_params(_flatten(config.model_dump(mode="json")))

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """MLflow params are flat: training.learning_rate rather than a nested section."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
