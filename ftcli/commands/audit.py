"""The audit command: K-fold cross-validation of the training split, and the training examples
whose labels are probably wrong.

Each fold is an ordinary run (data.fold set), trained one after another by the train recipe and
resumed like any run; every fold reuses the one tokenization cache. The fold's model scores the
examples it never saw, so every training example gets out-of-fold probabilities, and cleanlab's
confident learning reads them against the given labels.

    output_dir/<name>-audit/
      <name>-fold-<i>/          one run directory per fold
      cross_validation.json     each fold's validation metrics, their mean and standard deviation
      out_of_fold.jsonl         every training example: fold, texts, label, out-of-fold probabilities
      label_issues.csv          the examples whose labels are probably wrong, the likeliest first
      report.html               the folds' curves, the cross-validated metrics and the label issues
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ftcli.commands.evaluate import evaluate_run
from ftcli.commands.train import train_run
from ftcli.config import Config, FoldConfig, dump_config, load_config, validate
from ftcli.data.folds import fold_of_documents, labels_by_document, select_documents
from ftcli.data.prepare import load_raw_splits
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.fileio import atomic_write_json, atomic_write_text
from ftcli.runs.rundir import RunDir
from ftcli import tasks
from ftcli.training.job import TrainingEvents
from ftcli.training.recipe import setup_data

CROSS_VALIDATION_FILE = "cross_validation.json"
OUT_OF_FOLD_FILE = "out_of_fold.jsonl"
LABEL_ISSUES_FILE = "label_issues.csv"


@dataclass
class AuditResult:
    folder: Path
    folds: list[Path]  # the fold runs
    trained: int  # folds trained (or resumed) by this command; the others were complete
    metrics: dict[str, dict[str, Any]]  # name: mean, std, per fold
    issues: list[dict[str, Any]]  # label_issues.csv's rows, likeliest first
    examples: int  # training examples audited


def run_audit(
    config: Config,
    folds: int = 5,
    overwrite: bool = False,
    events: TrainingEvents | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> AuditResult:
    """Train (or resume, or reuse) every fold, gather the out-of-fold probabilities, rank the label issues."""
    tasks.require_support(config.task, "audit", "score a trained run instead: ftcli evaluate RUN")
    cleanlab = require("cleanlab", "audit", "ftcli audit")
    _, _, prepared = setup_data(config)  # tokenized once, into the cache every fold reads
    if "train" not in prepared.splits:
        raise FtcliError("an audit cross-validates the training split, and this config has none", "set data.train")
    folder = Path(config.output_dir) / f"{config.name}-audit"
    task, train = tasks.get(config.task), prepared.splits["train"]
    assignment = fold_of_documents(train, config.task, FoldConfig(folds=folds, index=0, seed=config.training.seed))
    out_of_fold, fold_metrics, runs, trained = None, [], [], 0
    for index in range(folds):
        fold_config = _fold_config(config, folder, folds, index)
        trained += _train_fold(fold_config, overwrite, events, say, index, folds)
        evaluation = evaluate_run(fold_config.run_dir)
        # The fold's validation is these documents, in this order (folds.hold_out).
        held_out = task.per_example(evaluation.scores, select_documents(train, np.flatnonzero(assignment == index)))
        if out_of_fold is None:  # per sentence (a tag per word): an array of arrays
            out_of_fold = np.zeros((len(assignment), *held_out.shape[1:]), dtype=held_out.dtype)
        out_of_fold[assignment == index] = held_out
        fold_metrics.append(evaluation.metrics)
        runs.append(fold_config.run_dir)
    labels = task.per_example(labels_by_document(train), train)
    issues = task.label_issues(cleanlab, labels, out_of_fold, prepared.label_names)
    result = AuditResult(folder, runs, trained, _summary(fold_metrics), issues, len(assignment))
    _write(result, config, assignment, labels, out_of_fold)
    return result


def _fold_config(config: Config, folder: Path, folds: int, index: int) -> Config:
    raw = copy.deepcopy(config.model_dump(mode="json"))
    raw |= {"name": f"{config.name}-fold-{index}", "output_dir": str(folder), "push_to_hub": None, "sweep": None}
    raw["data"]["fold"] = {"folds": folds, "index": index, "seed": config.training.seed}
    return validate(raw, source=f"fold {index}")


def _train_fold(config: Config, overwrite: bool, events: TrainingEvents | None, say: Callable[[str], None], index: int, folds: int) -> bool:
    """Train the fold's run, resume it when interrupted, or keep it when complete; True when trained."""
    run = RunDir(config.run_dir)
    state = "new" if overwrite or not run.config_file.is_file() else _state(run, config)
    if state == "complete":
        say(f"fold {index + 1}/{folds}: complete ({run.path})")
        return False
    say(f"fold {index + 1}/{folds}: {'resuming' if state == 'resume' else 'training'} ({run.path})")
    train_run(config, overwrite=state != "resume", resume=state == "resume", events=events)
    return True


def _state(run: RunDir, config: Config) -> str:
    """complete, resume (checkpoints to continue from) or new (nothing worth keeping)."""
    if dump_config(load_config(run.config_file)) != dump_config(config):
        raise FtcliError(
            f"{run.path} was trained with another config",
            "restore that config, or pass --overwrite to retrain every fold",
        )
    if run.model_dir.is_dir() and "train" in run.read_metrics():
        return "complete"
    return "resume" if run.list_checkpoints() else "new"


def _summary(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each metric's mean and standard deviation over the folds (and each fold's value)."""
    names = [name for name in fold_metrics[0] if all(name in metrics for metrics in fold_metrics)]
    summary = {}
    for name in names:
        values = np.asarray([metrics[name] for metrics in fold_metrics], dtype=float)
        summary[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)), "folds": values.tolist()}
    return summary


def _write(result: AuditResult, config: Config, assignment: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> None:
    """cross_validation.json, out_of_fold.jsonl and label_issues.csv, each with the examples' texts."""
    from ftcli.reporting.html import write_audit_html

    rows = load_raw_splits(config.data)[0]["train"]
    texts, task = config.data.text_fields, tasks.get(config.task)
    result.issues = [
        task.issue_record(issue | {"fold": int(assignment[issue["index"]])}, rows[issue["index"]], texts) for issue in result.issues
    ]
    record = {"folds": len(result.folds), "examples": result.examples, "metrics": result.metrics, "issues": len(result.issues),
              "runs": [str(path) for path in result.folds]}
    atomic_write_json(result.folder / CROSS_VALIDATION_FILE, record)
    lines = []
    for index, row in enumerate(rows):
        line = {"index": index, "fold": int(assignment[index]), **{field: row[field] for field in texts}}
        line |= {"label": labels[index].tolist(), "out_of_fold": np.round(scores[index], 6).tolist()}
        lines.append(json.dumps(line, ensure_ascii=False))
    atomic_write_text(result.folder / OUT_OF_FOLD_FILE, "\n".join(lines) + "\n")
    atomic_write_text(result.folder / LABEL_ISSUES_FILE, issues_csv(result.issues, texts))
    write_audit_html(result.folds, result.folder, record | {"label_issues": result.issues})


def issues_csv(issues: list[dict[str, Any]], text_fields: list[str]) -> str:
    named = ["index", "fold", *text_fields, "given", "suggested", "quality"]
    task_columns = [key for key in (issues[0] if issues else {}) if key not in named]  # a task's own (a tagger's: the words)
    columns = ["rank", "index", "fold", *text_fields, *task_columns, "given", "suggested", "quality"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for rank, issue in enumerate(issues, start=1):
        writer.writerow({"rank": rank, **{column: issue[column] for column in columns[1:]}})
    return buffer.getvalue()
