"""The evaluate command: score a run's final model (or one checkpoint, or its LoRA adapter) on a labeled split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcli.data.prepare import prepare
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json
from ftcli.inference import score_dataset
from ftcli.metrics import MetricSuite
from ftcli.modeling import label_names_of
from ftcli.runs.loading import load_run
from ftcli.runtime import Runtime


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: dict[str, list]  # labels, and counts: a row per true label, a column per predicted one
    written: Path


def evaluate_run(
    run_path: str | Path,
    split: str = "validation",
    checkpoint: str | Path | None = None,
    adapter: bool = False,
    precision: str | None = None,
) -> Evaluation:
    """Metrics and confusion matrix of the run's model on one split, written as eval_<split>.json (in
    the checkpoint's or the adapter's folder when one is scored); the final model's metrics also
    update metrics.json. precision: the run's training.precision unless given."""
    loaded = load_run(run_path, checkpoint, adapter)
    run, config, model, tokenizer = loaded.run, loaded.config, loaded.model, loaded.tokenizer
    runtime = Runtime.resolve(precision or config.training.precision)
    prepared = prepare(config.data, tokenizer)
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
    suite = MetricSuite(config.metrics, len(prepared.label_names))
    metrics = score_dataset(
        model.to(runtime.device), prepared.splits[split], suite, config.training.eval_batch_size,
        tokenizer.pad_token_id, runtime,
    )
    confusion = {"labels": prepared.label_names, "counts": suite.confusion.tolist()}
    target = run.eval_file(split, None if loaded.is_final else loaded.weights)
    atomic_write_json(target, {"split": split, "model": str(loaded.weights), **metrics, "confusion_matrix": confusion})
    if loaded.is_final:
        run.update_metrics(split, metrics)
    return Evaluation(metrics, confusion, target)
