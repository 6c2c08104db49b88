"""The train recipe, top to bottom: set up (data, model, run directory), train, save, evaluate."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ftcli.backends import TrainJob, TrainOutcome, get_backend
from ftcli.config import Config, dump_config
from ftcli.data import Prepared, prepare
from ftcli.diagnosis import Diagnosis, majority_baseline
from ftcli.inference import evaluate_dataset, pick_device
from ftcli.metrics import MetricSuite
from ftcli.modeling import load_model, load_tokenizer, resolve_model_source
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


def setup_data(config: Config) -> tuple[str, PreTrainedTokenizerBase, Prepared]:
    """Resolve the model, load its tokenizer and prepare (or fetch from cache) the tokenized splits."""
    source = resolve_model_source(config.model)
    if config.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run on this machine", config.model)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    return source, tokenizer, prepare(config.data, tokenizer)


def train(config: Config, overwrite: bool = False, show_progress: bool = True) -> TrainResult:
    # Setup. Everything that can fail on user input fails here, before the run directory exists.
    tracker = Tracker(config.report_to)  # before tokenizing: a missing package should fail at once
    source, tokenizer, prepared = setup_data(config)
    MetricSuite(config.metrics, num_labels=len(prepared.label_names))
    set_seed(config.training.seed)
    model = load_model(source, prepared.label_names, config.trust_remote_code)
    run = RunDir.create(config.run_dir, overwrite=overwrite)
    device = pick_device()
    atomic_write_text(run.config_file, dump_config(config))
    run.write_env(str(device))

    # Train, mirroring each event into the trackers report_to names.
    tracker.start(run, config)
    job = TrainJob(config, prepared, model, tokenizer, run, TrainingProgress(enabled=show_progress), tracker=tracker)
    try:
        outcome = get_backend(config.backend).train(job)
    finally:
        tracker.close()  # flushes what was logged, even when training fails

    # Save the kept (best) weights, then score them on every labeled split but train.
    save_model(job.model, tokenizer, run.model_dir)
    metrics: dict[str, dict[str, float]] = {}
    if "validation" in prepared.splits:
        metrics["validation"] = evaluate_dataset(
            job.model.to(device),
            prepared.splits["validation"],
            config.metrics,
            config.training.eval_batch_size,
            tokenizer.pad_token_id,
            device,
            config.training.precision,
        )
        run.update_metrics("validation", metrics["validation"])
    run.update_metrics("train", _train_stats(outcome))

    # Read the curves: curves.png and diagnosis.json, accuracy judged against the majority class.
    run.update_metrics("data", majority_baseline(prepared.summary))
    diagnosis = analyze_run(run).diagnosis
    return TrainResult(run, outcome, metrics, prepared, diagnosis)


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
