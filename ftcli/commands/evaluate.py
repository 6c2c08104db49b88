"""The evaluate command: score a run's final model (or one checkpoint, or its LoRA adapter) on a labeled split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftcli.data.prepare import prepare
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json
from ftcli.inference import score_dataset
from ftcli.metrics import MetricSuite
from ftcli.modeling import label_names_of
from ftcli.runs.loading import load_run
from ftcli.objective import MultiLabelObjective, Objective
from ftcli.runtime import Runtime
from ftcli.tasks import MULTI_LABEL, SINGLE_LABEL


@dataclass
class Evaluation:
    task: str
    metrics: dict[str, float]
    labels: list[str]
    confusion: list[list[int]] | None  # single_label: a row per true class, a column per predicted one
    per_label: dict[str, list[float]] | None  # multi_label: precision, recall, f1, support per label
    thresholds: list[float] | None  # multi_label: each label's decision threshold
    written: Path


def evaluate_run(
    run_path: str | Path,
    split: str = "validation",
    checkpoint: str | Path | None = None,
    adapter: bool = False,
    precision: str | None = None,
) -> Evaluation:
    """Metrics of the run's model on one split, with the confusion matrix (single_label) or each
    label's scores and threshold (multi_label), written as eval_<split>.json (in the checkpoint's
    or the adapter's folder when one is scored); the final model's metrics also update
    metrics.json. precision: the run's training.precision unless given."""
    loaded = load_run(run_path, checkpoint, adapter)
    run, config, model, tokenizer = loaded.run, loaded.config, loaded.model, loaded.tokenizer
    runtime = Runtime.resolve(precision or config.training.precision)
    prepared = prepare(config.data, tokenizer, config.task)
    if split not in prepared.splits:
        raise FtcliError(
            f"split '{split}' is not in this run's data (available: {', '.join(prepared.splits)})",
            f"add data.{split} to {run.config_file}" if split in ("validation", "test") else "pick one of those",
        )
    if prepared.label_names != label_names_of(model):
        raise FtcliError(
            f"the model's labels {label_names_of(model)} differ from the data's {prepared.label_names}",
            "evaluate with the data the run was trained on",
        )
    suite = MetricSuite(config.metrics, len(prepared.label_names), config.task)
    metrics = score_dataset(
        model.to(runtime.device), prepared.splits[split], suite, config.training.eval_batch_size,
        tokenizer.pad_token_id, runtime, loaded.objective,
    )
    evaluation = Evaluation(
        config.task, metrics, prepared.label_names,
        confusion=suite.confusion.tolist() if config.task == SINGLE_LABEL else None,
        per_label=suite.per_label if config.task == MULTI_LABEL else None,
        thresholds=_thresholds(loaded.objective, len(prepared.label_names)),
        written=run.eval_file(split, None if loaded.is_final else loaded.weights),
    )
    atomic_write_json(evaluation.written, _record(evaluation, split, loaded.weights))
    if loaded.is_final:
        run.update_metrics(split, metrics)
    return evaluation


def _thresholds(objective: Objective, num_labels: int) -> list[float] | None:
    if not isinstance(objective, MultiLabelObjective):
        return None
    return np.broadcast_to(np.asarray(objective.thresholds, dtype=float), (num_labels,)).tolist()


def _record(evaluation: Evaluation, split: str, weights: Path) -> dict[str, Any]:
    """eval_<split>.json: the metrics, and what evaluate shows beside them."""
    record: dict[str, Any] = {"split": split, "model": str(weights), **evaluation.metrics}
    if evaluation.confusion is not None:
        record["confusion_matrix"] = {"labels": evaluation.labels, "counts": evaluation.confusion}
    if evaluation.per_label is not None:
        record["per_label"] = {"labels": evaluation.labels, **evaluation.per_label, "thresholds": evaluation.thresholds}
    return record
