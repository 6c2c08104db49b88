"""The decisions saved beside a model's weights (model/, a checkpoint, export/): the thresholds
tuned after training (thresholds.json), read into the Decider that both prediction engines
decide with (the torch objectives through runs.loading, the ONNX export directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftcli.config import Config
from ftcli.fileio import read_json
from ftcli.runs.rundir import THRESHOLDS_FILE
from ftcli import tasks
from ftcli.tasks import Decider


def decider_for(config: Config, folder: Path) -> Decider:
    """How a saved model's outputs are decided: the run's task with the thresholds saved beside
    its weights (model/, a checkpoint, export/), else the configured ones (the task's `decider`)."""
    return tasks.get(config.task).decider(config, saved_thresholds(folder))


def saved_thresholds(folder: Path) -> np.ndarray | None:
    """The thresholds tuned after training (thresholds.json), in label order; None when there are none."""
    path = folder / THRESHOLDS_FILE
    if not path.is_file():
        return None
    return np.asarray(list(read_json(path, "restore it from a backup")["thresholds"].values()), dtype=np.float64)
