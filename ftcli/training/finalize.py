"""What is decided after training, on validation, before the model is saved: a temperature that
calibrates its probabilities (folded into the model's last layer), and the decision thresholds
(multi_label's per label, a two-class run's tuned one). Each is written beside the model, so that
evaluate, predict, export and serving decide alike."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel

from ftcli.config import Config
from ftcli.fileio import atomic_write_json
from ftcli.inference import document_labels, documents_of, row_logits
from ftcli.metrics import compute_builtin, expected_calibration_error, primary_metric, reliability
from ftcli.modeling import scale_logits
from ftcli.objective import Objective, fit_temperature
from ftcli.runs.rundir import CALIBRATION_FILE, THRESHOLDS_FILE
from ftcli.runtime import Runtime
from ftcli import tasks

log = logging.getLogger("ftcli")


@dataclass
class Decisions:
    objective: Objective  # predicts with the thresholds decided
    label_names: list[str]
    calibration: dict[str, Any] | None = None  # calibration.json: the temperature, the scores before and after
    thresholds: np.ndarray | None = None
    how: str = "fixed"
    notes: dict[str, Any] = field(default_factory=dict)

    def save(self, model_dir: Path) -> None:
        if self.calibration is not None:
            atomic_write_json(model_dir / CALIBRATION_FILE, self.calibration)
        if self.thresholds is not None:
            # Two classes: the threshold is the second class's.
            names = self.label_names[1:] if len(self.thresholds) == 1 else self.label_names
            save_thresholds(model_dir, names, self.thresholds, self.how, self.notes)


def decide(
    config: Config, model: PreTrainedModel, validation: Dataset | None, pad_token_id: int, runtime: Runtime,
    objective: Objective, label_names: list[str],
) -> Decisions:
    """Calibrate (in place: the model's last layer takes the temperature) and pick the thresholds."""
    decisions = Decisions(objective, label_names)
    task = tasks.get(config.task)
    calibrating = config.calibration == "temperature" and task.calibrates
    tuning = task.tunes(config)
    if validation is None or not (calibrating or tuning):
        task.fixed_thresholds(config, decisions)  # no validation to tune on: the configured ones (0.5 for a tuned one)
        return decisions
    rows = row_logits(model, validation, config.training.eval_batch_size, pad_token_id, runtime)
    labels, documents = document_labels(validation, objective), documents_of(validation)
    if documents is not None and objective.picks_from_windows:  # merged, they are rows like any others
        rows, documents = objective.aggregate(rows, *documents), None
    per_example = _per_example(objective, documents)
    if calibrating:
        # What the task fits on: its examples, or the words of a tagger's sentences (the same rows for a windowed split).
        scorer, pairs, pair_labels = objective.calibration_pairs(rows, labels)
        temperature = _temperature(scorer, pairs, pair_labels, documents)
        if temperature is not None:
            decisions.calibration = _calibration_record(
                scorer, per_example(pairs), per_example(pairs / temperature), pair_labels, temperature
            )
            scale_logits(model, len(label_names), 1 / temperature)
            rows = rows / temperature
    return _thresholds(config, decisions, per_example(rows), labels)


def _per_example(objective: Objective, documents: tuple[torch.Tensor, int] | None):
    """Rows' logits as the examples' (windows put together into their documents')."""
    return (lambda rows: rows) if documents is None else (lambda rows: objective.aggregate(rows, *documents))


TEMPERATURE_STEPS = 20  # windows: tries between the best temperature and none


def _temperature(
    objective: Objective, rows: torch.Tensor, labels: torch.Tensor, documents: tuple[torch.Tensor, int] | None
) -> float | None:
    """The fitted temperature. Windows' averaged probabilities are not scale-free, so a temperature
    can flip a document's prediction: then the one nearest the best (on a log scale, towards 1)
    that flips none, or None when only 1 does."""
    best = fit_temperature(objective, rows, labels, documents)
    if documents is None:
        return best
    per_example = _per_example(objective, documents)
    reference = objective.predictions(per_example(rows))
    for temperature in np.exp(np.linspace(math.log(best), 0.0, TEMPERATURE_STEPS + 1))[:-1]:
        if np.array_equal(objective.predictions(per_example(rows / float(temperature))), reference):
            if temperature != best:
                log.warning(f"calibration: temperature {temperature:.3f}, not the best fit {best:.3f}, which would change predictions")
            return float(temperature)
    log.warning("calibration skipped: any temperature would change a document's prediction (its windows' probabilities are averaged)")
    return None


def _thresholds(config: Config, decisions: Decisions, logits: torch.Tensor, labels: torch.Tensor) -> Decisions:
    """The thresholds the task tunes (or fixes) on validation's scores."""
    scores, truth = decisions.objective.scores(logits).numpy(), labels.numpy()
    tasks.get(config.task).tune_thresholds(config, decisions, scores, truth, primary_metric(config.metrics))
    return decisions


def _calibration_record(
    objective: Objective, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, temperature: float
) -> dict[str, Any]:
    """calibration.json: the temperature, and on validation the calibration before and after."""
    record: dict[str, Any] = {"method": "temperature", "temperature": temperature, "fitted_on": "validation"}
    for when, scaled in (("before", before), ("after", after)):
        scores = objective.scores(scaled).numpy()
        bins = reliability(scores, labels.numpy(), objective.task)
        record[when] = {
            "ece": expected_calibration_error(bins),
            "brier": compute_builtin("brier", None, labels.numpy(), scores.shape[-1], scores, objective.task),
            "log_loss": compute_builtin("log_loss", None, labels.numpy(), scores.shape[-1], scores, objective.task),
            "reliability": bins,
        }
    return record


def save_thresholds(model_dir: Path, label_names: list[str], thresholds: np.ndarray, how: str, notes: dict | None = None) -> None:
    """thresholds.json: each label's threshold by name, how it was chosen, and what tuning gained."""
    record = {"how": how, "thresholds": {name: float(value) for name, value in zip(label_names, thresholds)}}
    atomic_write_json(model_dir / THRESHOLDS_FILE, record | ({"effect": notes} if notes else {}))


