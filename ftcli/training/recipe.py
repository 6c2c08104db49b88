"""The train recipe, top to bottom: check, hold the run directory, prepare the data and the model,
train with the configured backend, save and score.

Nothing here draws on the terminal or reads curves: progress goes to the `events` handed in, and
the command layer reads the run afterwards (ftcli.commands.train).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from accelerate.utils import set_seed
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftcli.config import Config, dump_config, load_config
from ftcli.data.prepare import Prepared, baselines, prepare
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_text
from ftcli.inference import evaluate_dataset
from ftcli.lora import apply_lora, check_quantize, load_adapter_model, load_quantized_model, merge_lora
from ftcli.metrics import MetricSuite
from ftcli.modeling import (
    attention_of, enable_gradient_checkpointing, ensure_pad_token, load_model, load_tokenizer, pad_like_tokenizer,
    preferred_attention, resolve_gradient_checkpointing, resolve_model_source, save_model,
)
from ftcli.objective import Distilled, Objective, build_objective
from ftcli.runs import checkpoints
from ftcli.runs.rundir import RunDir
from ftcli.runtime import Runtime, peak_memory, reset_peak_memory
from ftcli import tasks
from ftcli.training.backends import get_backend
from ftcli.training.finalize import decide
from ftcli.training.job import Backend, NoEvents, TrainingEvents, TrainJob, TrainOutcome
from ftcli.training.optim import check_optimizer
from ftcli.training.teacher import with_teacher
from ftcli.training.tracking import Tracker

log = logging.getLogger("ftcli")


@dataclass
class TrainResult:
    run: RunDir
    outcome: TrainOutcome
    metrics: dict[str, dict[str, float]]  # the kept model's scores, by split
    prepared: Prepared
    analysis: Any = field(default=None)  # what `analyze` returned


def train(
    config: Config,
    overwrite: bool = False,
    resume: bool | Literal["auto"] = False,
    resume_from: str | Path | None = None,
    events: TrainingEvents | None = None,
    on_evaluate: Callable[[dict[str, Any]], bool] | None = None,
    analyze: Callable[[RunDir], Any] | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train a new run, or with `resume` continue config's run from its newest checkpoint (or
    `resume_from`); resume="auto" continues the run when it has a checkpoint and starts it (afresh)
    otherwise. events: where progress and the result go (nowhere by default). on_evaluate sees every
    evaluation event and may stop training early by returning True. analyze reads the saved run
    (its curves, say) while the last checkpoint is still being written."""
    # Everything that can fail on user input fails here, before the run directory is touched.
    runtime = runtime or Runtime.resolve(config.training.precision, distributed=True)
    if resume == "auto":
        resume, overwrite = auto_resume(config, overwrite, resume_from)
    resuming = resume or resume_from is not None
    if resuming and overwrite:
        raise FtcliError("--resume continues a run, --overwrite replaces it", "pass one of them")
    backend = get_backend(config.backend)
    backend.check(config)
    check_optimizer(config.training.optimizer, runtime.device)
    check_quantize(config.lora, runtime.device)
    tracker = Tracker(config.report_to)  # before tokenizing: a missing package should fail at once
    # A run directory in the way is reported before minutes of tokenizing, not after. The main
    # process holds it from here until the run is saved and scored, and deletes an old run
    # (--overwrite) only once it holds it.
    run = RunDir.open(config.run_dir) if resuming else RunDir(config.run_dir)
    with hold(run, runtime, resuming, overwrite):
        tokenizer, prepared, objective, model, notes = setup(config, runtime)
        resume_point = reopen(config, run, resume_from, runtime) if resuming else start(config, run, runtime, notes)
        job = TrainJob(
            config, prepared, model, tokenizer, run, runtime, objective,
            events=events if events is not None and runtime.is_main else NoEvents(),
            resume_from=resume_point, tracker=tracker, on_evaluate=on_evaluate,
        )
        reset_peak_memory(runtime.device)
        outcome = run_backend(backend, job)
        outcome.extra.update(peak_memory(runtime.device))  # before saving and scoring, which need memory of their own
        if resume_point is not None:
            outcome.extra["resumed_from"] = str(resume_point)
        return finish(job, outcome, analyze)


def auto_resume(config: Config, overwrite: bool, resume_from: str | Path | None) -> tuple[bool, bool]:
    """--resume-auto as (resume, overwrite): continue a run that has a checkpoint, else start it, over
    what an earlier attempt left before its first checkpoint. So a preemptible job's script is the
    same command every time. Every process asks before any writes (the main process deletes nothing
    before the others have passed setup's barrier), so all find the same answer."""
    if overwrite or resume_from is not None:
        raise FtcliError("--resume-auto decides itself whether to continue or start the run", "leave out --overwrite and --resume-from")
    run = RunDir(config.run_dir)
    # A folder that is not a run is refused by the overwrite, as --overwrite refuses it.
    has_checkpoint = run.config_file.is_file() and bool(run.list_checkpoints())
    return has_checkpoint, not has_checkpoint


def hold(run: RunDir, runtime: Runtime, resuming: bool, overwrite: bool) -> AbstractContextManager:
    """The main process's hold on the run directory: its lock, and for a new run its place."""
    if not runtime.is_main:
        return nullcontext()
    return run.lock() if resuming else RunDir.claim(run.path, overwrite)


def setup(config: Config, runtime: Runtime) -> tuple[PreTrainedTokenizerBase, Prepared, Objective, PreTrainedModel, dict[str, Any]]:
    """The tokenizer, the prepared data, the objective, the model to train and what env.json says of
    them (the pad token: the tokenizer's, or the one ftcli chose where it had none; the attention and
    gradient checkpointing that run). The model loads in a thread while the splits are tokenized: it
    needs only the label names, known before tokenizing starts. With several processes the main
    ones tokenize into the cache while the others wait, then read the cache."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftcli-model") as loader:
        loading: list[Future[tuple[PreTrainedModel, dict[str, Any]]]] = []

        def load_meanwhile(source: str, label_names: list[str]) -> None:
            loading.append(loader.submit(seeded_model, config, source, label_names, runtime))

        with tokenize_in_turn(runtime):
            _, tokenizer, prepared = setup_data(config, on_labels=load_meanwhile)
            MetricSuite(config.metrics, prepared.label_names, config.task)  # an unknown metric fails now
            objective = build_objective(config, prepared)  # and class weights that do not fit the labels
            if config.distill is not None:  # the teacher's logits, computed (or read) in turn as the tokens are
                prepared = with_teacher(config, prepared, tokenizer, runtime)
        padding = ensure_pad_token(tokenizer)
        model, notes = loading[0].result()
        pad_like_tokenizer(model, tokenizer)
        return tokenizer, prepared, objective, model, {"pad_token": padding} | notes


def seeded_model(
    config: Config, source: str, label_names: list[str], runtime: Runtime
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """setup_model after the seed is set, which the new head's initialisation draws from. Nothing
    else draws from torch's generator while it runs: tokenizing does not."""
    set_seed(config.training.seed)
    return setup_model(config, source, label_names, runtime)


@contextmanager
def tokenize_in_turn(runtime: Runtime) -> Iterator[None]:
    """With several processes: the global main process tokenizes first; then each machine's main
    process (a cache hit where the cache is on storage every machine shares, one tokenization per
    machine where it is local); then the rest, who find their machine's cache. Never once per rank."""
    if runtime.num_processes == 1:
        yield
        return
    from accelerate import PartialState

    processes = PartialState()
    with processes.main_process_first(), processes.local_main_process_first():
        yield


def setup_data(
    config: Config, on_labels: Callable[[str, list[str]], None] | None = None
) -> tuple[str, PreTrainedTokenizerBase, Prepared]:
    """Resolve the model, load its tokenizer and prepare (or fetch from cache) the tokenized
    splits; on_labels hears the model's source and the label names before the splits are tokenized."""
    source = resolve_model_source(config.model)
    if config.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run on this machine", config.model)
    tokenizer = load_tokenizer(source, config.trust_remote_code)

    def heard(label_names: list[str]) -> None:
        tasks.get(config.task).check_label_names(config, label_names)
        if on_labels is not None:
            on_labels(source, label_names)

    return source, tokenizer, prepare(config.data, tokenizer, config.task, on_labels=heard)


def setup_model(
    config: Config, source: str, label_names: list[str], runtime: Runtime
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The model to train: pretrained weights and a new head, wrapped in LoRA adapters and
    recomputing activations when the config (or its auto, for this model on this device) says so;
    and env.json's notes of the attention and gradient checkpointing that run, with why."""
    task = tasks.get(config.task)
    if config.lora and config.lora.quantize:
        model = load_quantized_model(source, label_names, config.lora, config.trust_remote_code, task.problem_type, task.model_head)
    else:
        attention = preferred_attention(source, runtime.device, runtime.autocast_dtype, config.trust_remote_code)
        model = load_model(source, label_names, config.trust_remote_code, task.problem_type, head=task.model_head, attention=attention)
    checkpointing, why = resolve_gradient_checkpointing(config.training.gradient_checkpointing, model.config, runtime.device)
    notes = {"attention": attention_of(model), "gradient_checkpointing": checkpointing, "gradient_checkpointing_reason": why}
    if config.lora:
        model = apply_lora(model, config.lora, task.model_head)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model, notes


def start(config: Config, run: RunDir, runtime: Runtime, notes: dict[str, Any]) -> None:
    """A fresh run: an old one in its place is deleted, the resolved config and the environment
    (with setup's `notes`: the pad token, the attention, gradient checkpointing) written."""
    if runtime.is_main:
        run.clear()
        atomic_write_text(run.config_file, dump_config(config))
        run.write_env(str(runtime.device), runtime.precision, runtime.precision_reason, **notes)
    _wait_for_everyone(runtime)


def reopen(config: Config, run: RunDir, resume_from: str | Path | None, runtime: Runtime) -> Path:
    """The checkpoint to continue `run` from; the run keeps the config it started with, wherever
    its directory is now."""
    # Both through the schema, so that keys added to ftcli since the run started count as their defaults.
    saved = load_config(run.config_file)
    changed = _changed_keys(saved.model_dump(mode="json"), config.model_dump(mode="json"), skip=LOCATION_KEYS)
    if changed:
        raise FtcliError(
            f"the config differs from the one {run.path} was trained with ({', '.join(changed)})",
            f"resume with the run's own config: ftcli train {run.path} --resume",
        )
    resume_point = checkpoints.resume_point(run, resume_from, config.backend)
    if runtime.is_main:
        checkpoints.rewind(run, resume_point)
        if saved.run_dir.resolve() != run.path.resolve():
            log.warning("the run was moved from %s; it continues in %s", saved.run_dir, run.path)
            atomic_write_text(run.config_file, dump_config(config))
    _wait_for_everyone(runtime)
    return resume_point


# Where a run lives, not what it trains: a run moved to another disk is the same experiment.
LOCATION_KEYS = frozenset({"output_dir", "name"})


def _changed_keys(saved: dict, current: dict, prefix: str = "", skip: frozenset[str] = frozenset()) -> list[str]:
    changed = []
    for key in [key for key in dict.fromkeys([*saved, *current]) if key not in skip]:
        before, now = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            changed += _changed_keys(before, now, f"{prefix}{key}.")
        elif before != now:
            changed.append(f"{prefix}{key}")
    return changed


def run_backend(backend: Backend, job: TrainJob) -> TrainOutcome:
    """Train, mirroring each event into the trackers report_to names; SIGINT and SIGTERM save a
    checkpoint and stop at the next optimizer step."""
    if job.runtime.is_main:
        job.tracker.start(job.run, job.config)
    try:
        with job.stop_signals:
            return backend.train(job)
    finally:
        job.events.stop()  # a failed run leaves no live progress display behind its error
        job.tracker.close()  # flushes what was logged, even when training fails


def finish(job: TrainJob, outcome: TrainOutcome, analyze: Callable[[RunDir], Any] | None) -> TrainResult:
    """Save and score the kept model while the last checkpoint is still being written, then wait for it."""
    run, prepared = job.run, job.prepared
    try:
        if not job.runtime.is_main:
            return TrainResult(run, outcome, {}, prepared)
        metrics = save_and_score(job, outcome)
        run.update_metrics("train", outcome.stats())
        # The curves are read against what a model that learned nothing would score.
        run.update_metrics("data", baselines(prepared, job.config.task))
        job.events.scored(outcome, metrics)  # the result is shown before the curves are drawn
        analysis = analyze(run) if analyze is not None else None
    finally:
        outcome.settle_saves()  # the last checkpoint, written meanwhile, is published
    return TrainResult(run, outcome, metrics, prepared, analysis)


def save_and_score(job: TrainJob, outcome: TrainOutcome) -> dict[str, dict[str, float]]:
    """Decide on validation what is decided after training (the calibrating temperature, the
    thresholds), save the kept (best) weights into model/ with those decisions, then score the
    model on the validation split. A LoRA run saves its adapters, then the model with the
    adapters merged in."""
    config, run, tokenizer, runtime = job.config, job.run, job.tokenizer, job.runtime
    validation = job.prepared.splits.get("validation")
    model = outcome.model.to(runtime.device)
    # A distilled student's decisions are its task's (its Distilled objective only trains it).
    objective = job.objective.objective if isinstance(job.objective, Distilled) else job.objective
    decisions = decide(config, model, validation, tokenizer.pad_token_id, runtime, objective, job.prepared.label_names)
    if config.lora:
        save_model(model, tokenizer, run.adapter_dir)
        model = merge_lora(full_precision(job) if config.lora.quantize else model)
    save_model(model, tokenizer, run.model_dir)
    decisions.save(run.model_dir)
    metrics: dict[str, dict[str, float]] = {}
    if validation is not None:
        metrics["validation"] = evaluate_dataset(
            model, validation, config.metrics, config.training.eval_batch_size, tokenizer.pad_token_id, runtime,
            decisions.objective,
        )
        run.update_metrics("validation", metrics["validation"])
    return metrics


def full_precision(job: TrainJob) -> torch.nn.Module:
    """A QLoRA run's saved adapter on the base model in full precision: merged into 4-bit weights the
    adapters would be rounded away, and model/ would need bitsandbytes and a GPU to load."""
    config, task = job.config, tasks.get(job.config.task)
    model = load_adapter_model(
        job.run.adapter_dir, resolve_model_source(config.model), job.prepared.label_names, config.trust_remote_code,
        task.problem_type, task.model_head,
    )
    pad_like_tokenizer(model, job.tokenizer)
    return model.to(job.runtime.device)


def _wait_for_everyone(runtime: Runtime) -> None:
    if runtime.num_processes > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
