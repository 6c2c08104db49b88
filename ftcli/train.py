"""The train recipe, top to bottom: set up (data, model, run directory), train, save, evaluate."""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ftcli import checkpoint, push
from ftcli.backends import TrainJob, TrainOutcome, check_launch, get_backend
from ftcli.config import Config, dump_config, load_config
from ftcli.data import Prepared, prepare
from ftcli.diagnosis import Diagnosis, majority_baseline
from ftcli.errors import FtcliError
from ftcli.inference import evaluate_dataset, pick_device, resolved_precision
from ftcli.metrics import MetricSuite
from ftcli.lora import apply_lora, merge_lora
from ftcli.modeling import enable_gradient_checkpointing, load_model, load_tokenizer, resolve_model_source
from ftcli.optim import check_optimizer
from ftcli.report import analyze_run
from ftcli.rundir import RunDir, atomic_write_text
from ftcli.tracking import Tracker
from ftcli.ui import TrainingProgress

log = logging.getLogger("ftcli")


@dataclass
class TrainResult:
    run: RunDir
    outcome: TrainOutcome
    metrics: dict[str, dict[str, float]]
    prepared: Prepared
    diagnosis: Diagnosis | None = None
    pushed_to: str | None = None


def setup_data(config: Config) -> tuple[str, PreTrainedTokenizerBase, Prepared]:
    """Resolve the model, load its tokenizer and prepare (or fetch from cache) the tokenized splits."""
    source = resolve_model_source(config.model)
    if config.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run on this machine", config.model)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    return source, tokenizer, prepare(config.data, tokenizer)


def setup_model(config: Config, source: str, label_names: list[str]) -> torch.nn.Module:
    """The model to train: pretrained weights and a new head, wrapped in LoRA adapters and
    recomputing activations when the config says so."""
    model = load_model(source, label_names, config.trust_remote_code)
    if config.lora:
        model = apply_lora(model, config.lora)
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def train(
    config: Config,
    overwrite: bool = False,
    show_progress: bool = True,
    resume: bool = False,
    resume_from: str | Path | None = None,
    on_evaluate: Callable[[dict[str, Any]], bool] | None = None,
) -> TrainResult:
    """Train a new run, or with `resume` continue config's run from its newest checkpoint (or `resume_from`).
    `on_evaluate` sees every evaluation event and may stop training early by returning True."""
    # Setup. Everything that can fail on user input fails here, before the run directory exists.
    # With several processes the main one prepares the data (tokenizing into the cache) while the
    # others wait, then read the cache; only the main one writes the run directory.
    device = pick_device()
    processes = PartialState(cpu=device.type == "cpu")
    is_main = processes.is_main_process
    check_optimizer(config.training.optimizer, device)
    check_launch(config.backend)
    if config.push_to_hub:
        push.check_hub_access()  # before hours of training, not after
    tracker = Tracker(config.report_to)  # before tokenizing: a missing package should fail at once
    resuming = resume or resume_from is not None
    if resuming and overwrite:
        raise FtcliError("--resume continues a run, --overwrite replaces it", "pass one of them")
    # A run directory in the way is reported before minutes of tokenizing, not after. The main
    # process holds the run directory from here until the run is saved and scored, and deletes an
    # old run (--overwrite) only once it holds it.
    run = RunDir.open(config.run_dir) if resuming else RunDir(config.run_dir)
    if not is_main:
        holding = nullcontext()
    else:
        holding = run.lock() if resuming else RunDir.claim(config.run_dir, overwrite)
    with holding:
        with processes.main_process_first():
            source, tokenizer, prepared = setup_data(config)
        MetricSuite(config.metrics, num_labels=len(prepared.label_names))
        weights = class_weights(config.training.class_weights, prepared)
        set_seed(config.training.seed)
        model = setup_model(config, source, prepared.label_names)
        if resuming:
            resume_point = reopen(config, run, resume_from, is_main)
        else:
            resume_point = None
            if is_main:
                run.clear()
                atomic_write_text(run.config_file, dump_config(config))
                run.write_env(str(device), resolved_precision(config.training.precision, device))
        processes.wait_for_everyone()

        # Train, mirroring each event into the trackers report_to names.
        if is_main:
            tracker.start(run, config)
        progress = TrainingProgress(enabled=show_progress and is_main)
        job = TrainJob(
            config, prepared, model, tokenizer, run, progress, resume_point, is_main,
            tracker=tracker, on_evaluate=on_evaluate, class_weights=weights,
        )
        try:
            with job.stop_signals:  # SIGINT and SIGTERM: save and stop at the next optimizer step
                outcome = get_backend(config.backend).train(job)
        finally:
            progress.stop()  # a failed run leaves no live bar behind its error
            tracker.close()  # flushes what was logged, even when training fails
        if resume_point is not None:
            outcome.extra["resumed_from"] = str(resume_point)
        try:
            if not is_main:
                return TrainResult(run, outcome, {}, prepared)
            metrics = save_and_score(job, device)
            run.update_metrics("train", _train_stats(outcome))
            # Read the curves: curves.png and diagnosis.json, accuracy judged against the majority class.
            # A run shorter than logging_steps, without validation, has none to read.
            run.update_metrics("data", majority_baseline(prepared.summary))
            diagnosis = analyze_run(run).diagnosis if run.read_events() else None
        finally:
            job.settle_saves()  # the last checkpoint, written meanwhile, is published
        pushed_to = push.push_run(run, config.push_to_hub) if config.push_to_hub else None
        return TrainResult(run, outcome, metrics, prepared, diagnosis, pushed_to)


def class_weights(setting: str | list[float] | None, prepared: Prepared) -> torch.Tensor | None:
    """The training loss's weight per class (label id order), from training.class_weights."""
    if setting is None:
        return None
    names = prepared.label_names
    if setting != "balanced":
        if len(setting) != len(names):
            raise FtcliError(
                f"training.class_weights has {len(setting)} weights for {len(names)} labels ({', '.join(names)})",
                "give one weight per label, in data.label_names order, or use balanced",
            )
        return torch.tensor(setting, dtype=torch.float32)
    counts = prepared.summary["train"].label_counts
    missing = [name for name in names if not counts[name]]
    if missing:
        raise FtcliError(
            f"training.class_weights: balanced is undefined: label '{missing[0]}' has no training examples",
            "give training.class_weights as one weight per label",
        )
    total = sum(counts.values())
    return torch.tensor([total / (len(names) * counts[name]) for name in names], dtype=torch.float32)


def save_and_score(job: TrainJob, device: torch.device) -> dict[str, dict[str, float]]:
    """Save the kept (best) weights into model/, then score them on the validation split. A LoRA
    run saves its adapters, then the model with the adapters merged in."""
    config, run, tokenizer = job.config, job.run, job.tokenizer
    if config.lora:
        save_model(job.model, tokenizer, run.adapter_dir)
        job.model = merge_lora(job.model)
    save_model(job.model, tokenizer, run.model_dir)
    metrics: dict[str, dict[str, float]] = {}
    if "validation" in job.prepared.splits:
        metrics["validation"] = evaluate_dataset(
            job.model.to(device),
            job.prepared.splits["validation"],
            config.metrics,
            config.training.eval_batch_size,
            tokenizer.pad_token_id,
            device,
            config.training.precision,
        )
        run.update_metrics("validation", metrics["validation"])
    return metrics


def reopen(config: Config, run: RunDir, resume_from: str | Path | None, is_main: bool) -> Path:
    """The checkpoint to continue `run` from; the run keeps the config it started with."""
    # Both through the schema, so that keys added to ftcli since the run started count as their defaults.
    changed = _changed_keys(load_config(run.config_file).model_dump(mode="json"), config.model_dump(mode="json"))
    if changed:
        raise FtcliError(
            f"the config differs from the one {run.path} was trained with ({', '.join(changed)})",
            f"resume with the run's own config: ftcli train {run.path} --resume",
        )
    resume_point = checkpoint.resume_point(run, resume_from, config.backend)
    if is_main:
        checkpoint.rewind(run, resume_point)
    return resume_point


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in dict.fromkeys([*saved, *current]):
        before, now = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            changed += _changed_keys(before, now, f"{prefix}{key}.")
        elif before != now:
            changed.append(f"{prefix}{key}")
    return changed


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save as safetensors with tokenizer and label names, into a staging folder renamed into place."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _train_stats(outcome: TrainOutcome) -> dict[str, float | int | str | bool | None]:
    stats = asdict(outcome)
    extra = stats.pop("extra")
    seconds = max(outcome.train_seconds, 1e-9)
    return stats | {"train_samples_per_second": outcome.train_samples / seconds} | extra
