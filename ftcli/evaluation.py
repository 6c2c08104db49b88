"""The evaluate command: score a run's final model (or one checkpoint, or its LoRA adapter) on a labeled split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from ftcli.config import Config, load_config
from ftcli.data import prepare
from ftcli.errors import FtcliError
from ftcli.inference import pick_device, score_dataset
from ftcli.lora import is_adapter, load_adapter_model
from ftcli.metrics import MetricSuite
from ftcli.modeling import label_names_of, load_model, load_tokenizer, resolve_model_source
from ftcli.rundir import RunDir, atomic_write_json


def load_run_model(
    run_path: str | Path, checkpoint: str | Path | None = None, adapter: bool = False
) -> tuple[RunDir, Config, PreTrainedModel, PreTrainedTokenizerBase]:
    """A run's config with its final model (or a checkpoint's, or the base model with the run's
    LoRA adapter) and tokenizer, on the best device."""
    run = RunDir.open(run_path)
    config = load_config(run.config_file)
    if adapter:
        if checkpoint is not None:
            raise FtcliError("--adapter and --checkpoint both choose the weights", "pass one of them")
        if not run.adapter_dir.is_dir():
            raise FtcliError(f"{run.path} has no adapter/", "only runs trained with a lora: section have one")
        checkpoint = run.adapter_dir
    model_path = run.require_model(checkpoint)
    tokenizer_path = model_path if (model_path / "tokenizer_config.json").is_file() else run.model_dir
    tokenizer = load_tokenizer(str(tokenizer_path), config.trust_remote_code)
    if is_adapter(model_path):
        model = load_adapter_model(
            model_path, resolve_model_source(config.model), _run_label_names(run), config.trust_remote_code
        )
    else:
        model = load_model(str(model_path), trust_remote_code=config.trust_remote_code)
    return run, config, model.to(pick_device()), tokenizer


def _run_label_names(run: RunDir) -> list[str]:
    """The class names an adapter's head was trained on, kept in the config of the run's model/."""
    if not (run.model_dir / "config.json").is_file():
        raise FtcliError(
            f"an adapter needs the label names in {run.model_dir / 'config.json'}, which does not exist",
            "train the run to the end first",
        )
    id2label = AutoConfig.from_pretrained(run.model_dir).id2label
    return [id2label[index] for index in sorted(id2label)]


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
    run, config, model, tokenizer = load_run_model(run_path, checkpoint, adapter)
    if adapter:
        checkpoint = run.adapter_dir
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
        model,
        prepared.splits[split],
        suite,
        config.training.eval_batch_size,
        tokenizer.pad_token_id,
        pick_device(),
        precision or config.training.precision,
    )
    confusion = {"labels": prepared.label_names, "counts": suite.confusion.tolist()}
    checkpoint_dir = run.require_model(checkpoint) if checkpoint is not None else None
    target = run.eval_file(split, checkpoint_dir)
    atomic_write_json(
        target, {"split": split, "model": str(checkpoint_dir or run.model_dir), **metrics, "confusion_matrix": confusion}
    )
    if checkpoint is None:
        run.update_metrics(split, metrics)
    return Evaluation(metrics, confusion, target)
