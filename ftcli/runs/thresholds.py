"""The decisions saved beside a model's weights (model/, a checkpoint, export/): the thresholds
tuned after training (thresholds.json), read into the Decider that both prediction engines
decide with (the torch objectives through runs.loading, the ONNX export directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ftcli.config import Config
from ftcli.decisions import Decider
from ftcli.fileio import read_json
from ftcli.runs.rundir import THRESHOLDS_FILE
from ftcli.tasks import MULTI_LABEL, REGRESSION, SINGLE_LABEL


def decider_for(config: Config, folder: Path) -> Decider:
    """How a saved model's outputs are decided: the run's task with the thresholds saved beside
    its weights (model/, a checkpoint, export/), else multi_label's fixed config.thresholds."""
    if config.task == REGRESSION:
        return Decider(REGRESSION, clip=tuple(config.data.label_range) if config.data.clip_predictions else None)
    saved = saved_thresholds(folder)
    if config.task == MULTI_LABEL:
        fixed = config.thresholds if isinstance(config.thresholds, float) else 0.5  # tuned, without a validation split
        return Decider(MULTI_LABEL, thresholds=fixed if saved is None else saved)
    return Decider(SINGLE_LABEL, decision_threshold=None if saved is None else float(saved[0]))


def saved_thresholds(folder: Path) -> np.ndarray | None:
    """The thresholds tuned after training (thresholds.json), in label order; None when there are none."""
    path = folder / THRESHOLDS_FILE
    if not path.is_file():
        return None
    return np.asarray(list(read_json(path, "restore it from a backup")["thresholds"].values()), dtype=np.float64)
