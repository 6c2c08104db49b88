"""The evaluate command: score a run's final model (or one checkpoint, or its LoRA adapter) on a
labeled split, and say where it goes wrong.

    RUN/eval_<split>.json         metrics, the confusion matrix or each label's scores, the
                                  thresholds, calibration before and after, the error analysis
    RUN/predictions_<split>.jsonl each example: its texts, gold label(s) or value, prediction,
                                  probabilities, loss and whether it was right
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftcli.config import UNLABELED, Config
from ftcli.data.prepare import prepare, split_rows
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json, atomic_write_text, read_json
from ftcli.inference import score_and_keep
from ftcli.metrics import MetricSuite, compute_builtin, expected_calibration_error, reliability
from ftcli.modeling import label_names_of
from ftcli.objective import Objective
from ftcli.runs.loading import LoadedRun, load_run
from ftcli.runs.rundir import CALIBRATION_FILE
from ftcli.runtime import Runtime
from ftcli import tasks



@dataclass
class Evaluation:
    split: str
    task: str
    metrics: dict[str, float]
    labels: list[str]
    confusion: list[list[int]] | None  # single_label: a row per true class, a column per predicted one
    per_label: dict[str, list[float]] | None  # multi_label: precision, recall, f1, support per label
    thresholds: list[float] | None  # multi_label: each label's; two classes: the second class's, when set
    calibration: dict[str, Any] | None  # the split's ECE, Brier and log loss before and after calibration
    analysis: dict[str, Any]  # the task's analyse(), each listed example with its text
    written: Path
    predictions: Path
    notes: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None  # each example's probabilities (regression: its predicted value)


def evaluate_run(
    run_path: str | Path,
    split: str = "validation",
    checkpoint: str | Path | None = None,
    adapter: bool = False,
    precision: str | None = None,
) -> Evaluation:
    """Metrics of the run's model on one split with what evaluate shows beside them, written as
    eval_<split>.json and predictions_<split>.jsonl (in the checkpoint's or the adapter's folder
    when one is scored); the final model's metrics also update metrics.json. precision: the run's
    training.precision unless given."""
    loaded = load_run(run_path, checkpoint, adapter)
    run, config, tokenizer = loaded.run, loaded.config, loaded.tokenizer
    runtime = Runtime.resolve(precision or config.training.precision)
    prepared = prepare(config.data, tokenizer, config.task)
    _check(loaded, prepared.splits, prepared.label_names, split)
    suite = MetricSuite(config.metrics, prepared.label_names, config.task)
    metrics, logits, labels = score_and_keep(
        loaded.model.to(runtime.device), prepared.splits[split], suite, config.training.eval_batch_size,
        tokenizer.pad_token_id, runtime, loaded.objective,
    )
    folder = None if loaded.is_final else loaded.weights
    evaluation = Evaluation(
        split, config.task, metrics, prepared.label_names,
        confusion=None if suite.confusion is None else suite.confusion.tolist(),
        per_label=suite.per_label,
        thresholds=tasks.get(config.task).thresholds_of(loaded.objective, len(prepared.label_names)),
        calibration=_calibration(loaded, logits, labels),
        analysis={},
        written=run.eval_file(split, folder),
        predictions=(folder or run.path) / f"predictions_{split}.jsonl",
    )
    rows = split_rows(config.data, prepared, split)
    _analyse(evaluation, loaded.objective, logits, labels, rows, config, prepared.splits[split])
    atomic_write_json(evaluation.written, _record(evaluation, loaded.weights))
    if loaded.is_final:
        run.update_metrics(split, metrics)
    return evaluation


def _check(loaded: LoadedRun, splits, label_names: list[str], split: str) -> None:
    scored = [name for name in splits if name != UNLABELED]
    if split == UNLABELED:  # texts a distilled student learned from: their labels are placeholders
        raise FtcliError(
            f"split '{UNLABELED}' holds texts without labels (data.{UNLABELED}): there is nothing to score it against",
            f"evaluate {' or '.join(scored)}; ftcli predict RUN --input FILE predicts texts",
        )
    if split not in splits:
        raise FtcliError(
            f"split '{split}' is not in this run's data (available: {', '.join(scored)})",
            f"add data.{split} to {loaded.run.config_file}" if split in ("validation", "test") else "pick one of those",
        )
    if tasks.get(loaded.config.task).has_classes and label_names != label_names_of(loaded.model):
        raise FtcliError(
            f"the model's labels {label_names_of(loaded.model)} differ from the data's {label_names}",
            "evaluate with the data the run was trained on",
        )


def _calibration(loaded: LoadedRun, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any] | None:
    """When the model was calibrated: this split's ECE, Brier score and log loss with the
    calibrated probabilities and with those before (the logits times the temperature)."""
    path = loaded.weights / CALIBRATION_FILE
    if not path.is_file() or not tasks.get(loaded.config.task).calibrates:
        return None
    temperature = read_json(path, loaded.run.repair_hint)["temperature"]
    record: dict[str, Any] = {"temperature": temperature}
    scorer, pairs, pair_labels = loaded.objective.calibration_pairs(logits, labels)  # as it was fitted: examples, or words
    for when, scaled in (("before", pairs * temperature), ("after", pairs)):
        scores = scorer.scores(scaled).numpy()
        truth = pair_labels.numpy()
        record[when] = {
            "ece": expected_calibration_error(reliability(scores, truth, scorer.task)),
            "brier": compute_builtin("brier", None, truth, scores.shape[1], scores, scorer.task),
            "log_loss": compute_builtin("log_loss", None, truth, scores.shape[1], scores, scorer.task),
        }
    return record


def _analyse(
    evaluation: Evaluation, objective: Objective, logits: torch.Tensor, labels: torch.Tensor, rows: list[dict], config: Config,
    tokenized: Any,
) -> None:
    """The error analysis (its examples named with their first text, unless the task named them)
    and predictions_<split>.jsonl."""
    scores, decisions = objective.scores(logits).numpy(), objective.predictions(logits)
    evaluation.scores = scores
    losses, truth = objective.losses(logits, labels).numpy(), labels.numpy()
    evaluation.analysis = tasks.get(config.task).analyse(evaluation.labels, scores, decisions, truth, losses, rows, tokenized, config.data)
    first_text = config.data.text_fields[0]
    for listed in evaluation.analysis.values():
        for entry in listed:
            if "index" in entry and "text" not in entry:
                text = rows[entry["index"]][first_text]
                entry["text"] = " ".join(text) if isinstance(text, list) else text  # a sentence's words
    lines = [
        json.dumps(example_record(config, evaluation.labels, row, scores[index], decisions[index], truth[index], float(losses[index])), ensure_ascii=False)
        for index, row in enumerate(rows)
    ]
    atomic_write_text(evaluation.predictions, "\n".join(lines) + "\n")


def example_record(config: Config, names: list[str], row: dict, scores, decision, truth, loss: float) -> dict[str, Any]:
    """One line of predictions_<split>.jsonl."""
    record: dict[str, Any] = {field_name: row[field_name] for field_name in config.data.text_fields}
    return record | tasks.get(config.task).example_record(names, scores, decision, truth, loss, config.data)


def _record(evaluation: Evaluation, weights: Path) -> dict[str, Any]:
    """eval_<split>.json: the metrics, and what evaluate shows beside them."""
    record: dict[str, Any] = {"split": evaluation.split, "model": str(weights), **evaluation.metrics}
    if evaluation.confusion is not None:
        record["confusion_matrix"] = {"labels": evaluation.labels, "counts": evaluation.confusion}
    if evaluation.per_label is not None:
        record["per_label"] = {"labels": evaluation.labels, **evaluation.per_label, "thresholds": evaluation.thresholds}
    if tasks.get(evaluation.task).threshold_is_second_class and evaluation.thresholds:
        record["decision_threshold"] = evaluation.thresholds[0]
    if evaluation.calibration is not None:
        record["calibration"] = evaluation.calibration
    record["errors"] = evaluation.analysis
    record["predictions"] = str(evaluation.predictions)
    return record
