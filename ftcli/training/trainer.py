"""Backend `trainer`: the config mapped onto HF TrainingArguments and Trainer.

The loss is ftcli's objective (compute_loss), the schedule ftcli's (create_scheduler) and the data
order a function of (seed, epoch) (EpochSeededSampler); the rest is Trainer's own: its optimizer,
accumulation, mixed precision, evaluation loop and FSDP/DeepSpeed support.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Sampler
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import get_length_grouped_indices

from ftcli import tasks
from ftcli.config import Config
from ftcli.data.batching import TEACHER_COLUMNS, teacher_targets
from ftcli.fileio import atomic_write_json
from ftcli.inference import evaluate_dataset
from ftcli.metrics import MetricSuite, higher_is_better, primary_metric
from ftcli.runs import checkpoints
from ftcli.runtime import Runtime
from ftcli.training.flops import Fed, all_fed, flop_rates
from ftcli.training.job import TrainJob, TrainOutcome
from ftcli.objective import Objective
from ftcli.training.optim import build_scheduler, trainer_optimizer
from ftcli.training.stopping import LossWatch
from ftcli.training.timed_saves import SaveTimer

log = logging.getLogger("ftcli")

# metrics.json's kernels record, as the loop backend writes it: Trainer steps eagerly, with PyTorch's kernels.
KERNELS = {
    "step": "eager", "why": "the trainer backend (HF Trainer's steps)", "fused": [],
    "not_fused": "the fused kernels run only inside the loop backend's CUDA graph step",
}
# Trainer's log keys, renamed to the keys both backends write into metrics.jsonl.
LOG_KEYS = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}


class TrainerBackend:
    def check(self, config: Config) -> None:
        """Nothing to refuse up front: Trainer runs every launch Accelerate has. The loop backend's
        own options, asked for explicitly, are named rather than ignored without a word: the same
        config trains under either backend."""
        training = config.training
        asked = {
            "compile": training.compile == "cuda_graphs",
            "fused_kernels": training.fused_kernels is True,
            "data_on_device": training.data_on_device is True,
        }
        for option in [option for option, on in asked.items() if on]:
            log.warning("training.%s is an option of the loop backend; the trainer backend ignores it", option)

    def train(self, job: TrainJob) -> TrainOutcome:
        trainer = _trainer(job)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
        seconds = time.perf_counter() - started
        state, args = trainer.state, trainer.args
        real_tokens, fed = all_fed(trainer.accelerator, trainer.real_tokens, trainer.fed)
        if job.stop_signals.signal_number and state.global_step < state.max_steps:
            raise job.stop_signals.interrupted(job.run, state.global_step)
        return TrainOutcome(
            model=trainer.model,
            global_step=state.global_step,
            epoch=float(state.epoch or 0.0),
            train_seconds=seconds,
            # train_batch_size is per device times the GPUs nn.DataParallel uses when not launched distributed.
            train_samples=state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            best_checkpoint=state.best_model_checkpoint,
            best_score=state.best_metric,
            stopped_early=state.global_step < state.max_steps,
            extra={"real_tokens": real_tokens, "padded_tokens": fed.tokens, "kernels": KERNELS},
            model_flops=flop_rates(trainer.model, tasks.get(job.config.task).token_level).flops(fed),
        )


def _trainer(job: TrainJob) -> _StagedTrainer:
    config, runtime = job.config, job.runtime
    validation = job.prepared.splits.get("validation")
    args = training_arguments(config, runtime, str(job.run.checkpoints), has_validation=validation is not None)
    callbacks: list[TrainerCallback] = [_EventCallback(job)]
    if config.training.early_stopping_patience and validation is not None:
        callbacks.append(EarlyStoppingCallback(config.training.early_stopping_patience))
    trainer = _StagedTrainer(
        job=job,
        objective=job.objective.to(args.device),  # moved once, not at every step
        model=job.model,
        args=args,
        data_collator=_collator(job),
        train_dataset=job.prepared.splits["train"],
        eval_dataset=validation,
        processing_class=job.tokenizer,
        compute_metrics=_batched_metrics(config, job.prepared.label_names, job.objective),
        callbacks=callbacks,
    )
    trainer.add_callback(_ExtraSaves(trainer, _extra_save_every(config, validation is not None)))
    # ftcli draws its own progress bar and logs events itself.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # compute_loss returns the batch mean. Told that the model ignores num_items_in_batch, Trainer
    # divides that mean by grad_accum and leaves it alone across processes; otherwise it does
    # neither, and the gradient comes out grad_accum × processes too large (and so does the logged loss).
    trainer.model_accepts_loss_kwargs = False
    return trainer


def _collator(job: TrainJob) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Trainer's padding collator (a tag per token: labels padded with -100 as the inputs are), with
    a distilled student's teacher columns (batching.TEACHER_COLUMNS) taken aside and put back as tensors."""
    config = job.config
    padding = (DataCollatorForTokenClassification if tasks.get(config.task).token_level else DataCollatorWithPadding)(
        job.tokenizer, pad_to_multiple_of=config.training.resolved_pad_multiple(job.runtime.device.type)
    )
    if config.distill is None:
        return padding

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        targets = {name: [row.pop(name) for row in features] for name in TEACHER_COLUMNS if name in features[0]}
        batch = padding(features)
        return {**batch, **teacher_targets(targets, batch["input_ids"].shape[1])}

    return collate


class _ObjectiveTrainer(Trainer):
    """Trainer on ftcli's objective and schedule, seeded data order, and counts of real and padded
    training tokens (for throughput and padding efficiency); it stops at a nan or inf training loss
    before it logs or saves anything after it."""

    def __init__(self, *args, job: TrainJob, objective: Objective, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job, self.training, self.objective = job, job.config.training, objective
        self.real_tokens: torch.Tensor | int = 0  # this process's
        self.fed = Fed()  # this process's
        self.loss_watch: LossWatch | None = None

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps the columns the model's forward takes; a distilled student's teacher columns
        are compute_loss's."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [name for name in TEACHER_COLUMNS if name not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch mean of the objective's loss: weighted (training.class_weights) in training only."""
        labels = inputs.pop("labels")
        targets = {name: inputs.pop(name) for name in TEACHER_COLUMNS if name in inputs}  # a distilled student's
        outputs = model(**inputs)
        inputs["labels"] = labels
        if model.training:
            loss = self.objective.training_loss_sum(outputs.logits, labels, **targets) / len(labels)
        else:
            loss = self.objective.loss_sum(outputs.logits, labels) / len(labels)
        if model.training:
            mask = inputs["attention_mask"]
            self.real_tokens = mask.sum() + self.real_tokens  # stays on the device: no sync per step
            self.fed.add(*mask.shape)
            if self.loss_watch is None:
                self.loss_watch = LossWatch(mask.device)
            self.loss_watch.observe(loss, self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation, except for windows (long_text: window): Trainer would score each
        window, ftcli's evaluation scores each document."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if "doc" not in dataset.column_names:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        job = self.job
        metrics = evaluate_dataset(
            self.model, dataset, job.config.metrics, self.training.eval_batch_size, job.tokenizer.pad_token_id,
            job.runtime, self.objective,
        )
        output = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(output)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output)
        return output

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, self.training, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        # The training set as ftcli prepared it: Trainer hands over a copy without the length column.
        grouped = self.args.train_sampling_strategy == "group_by_length"
        return EpochSeededSampler(
            len(self.train_dataset),
            self.args.data_seed,
            lengths=list(self.train_dataset[self.args.length_column_name]) if grouped else None,
            group_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
        )

    def log(self, logs, *args, **kwargs) -> None:
        self.check_loss()
        super().log(logs, *args, **kwargs)

    def check_loss(self) -> None:
        if self.loss_watch is not None:
            self.loss_watch.check(self.accelerator, self.run)



class EpochSeededSampler(Sampler):
    """Trainer's training order (shuffled, or grouped by length as HF's LengthGroupedSampler groups
    it), drawn from a generator seeded by (seed, epoch) alone. Trainer's own samplers draw it from
    torch's global generator when the epoch starts, which a resumed run has not restored yet at that
    moment: resumed in a later epoch, it trained that epoch in another order than the uninterrupted
    run. Trainer calls set_epoch before each epoch, a resumed one too."""

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, group_size: int = 1) -> None:
        self.size, self.seed, self.lengths, self.group_size = size, seed, lengths, group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.lengths is None:
            return iter(torch.randperm(self.size, generator=generator).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


def training_arguments(config: Config, runtime: Runtime, output_dir: str, has_validation: bool) -> TrainingArguments:
    training, device, dtype = config.training, runtime.device, runtime.autocast_dtype
    primary = primary_metric(config.metrics)
    schedule = _schedule("eval", training.eval_every) if has_validation else {"eval_strategy": "no"}
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size,
        num_train_epochs=training.epochs or 1.0,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        optim=trainer_optimizer(training.optimizer, device),
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.scheduler,  # recorded; the schedule itself is build_scheduler's
        gradient_accumulation_steps=training.grad_accum,
        max_grad_norm=training.max_grad_norm or 0.0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        logging_nan_inf_filter=False,  # a nan loss shows in the log, not hidden behind the average
        **schedule,
        # Every evaluation is saved when save_every does not fall on each (a scored best model);
        # Trainer then saves at eval_every steps, and _ExtraSaves adds the save_every ones.
        **_schedule("save", training.eval_every if _extra_save_every(config, has_validation) else training.save_every),
        save_total_limit=None,  # _StagedTrainer prunes, keeping what the loop backend keeps
        load_best_model_at_end=has_validation,
        metric_for_best_model=f"eval_{primary}" if has_validation else None,
        greater_is_better=higher_is_better(primary),
        batch_eval_metrics=True,
        seed=training.seed,
        data_seed=training.seed,
        report_to="none",
        restore_callback_states_from_checkpoint=True,  # early stopping's patience continues on resume
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=0,
    )


def _schedule(kind: str, every: str | int) -> dict:
    if every == "epoch":
        return {f"{kind}_strategy": "epoch"}
    return {f"{kind}_strategy": "steps", f"{kind}_steps": every}


class _StagedTrainer(_ObjectiveTrainer):
    """Trainer whose checkpoints appear whole or not at all, and are pruned as the loop backend's.

    Trainer writes checkpoint-<step> in place; here it writes it under the staging folder of
    ftcli.runs.checkpoints, renamed into place once every process has written its part.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run = self.job.run
        self._staging_root: Path | None = None
        self.save_timer = SaveTimer(self.training.save_every_minutes)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.check_loss()
        final = self.run.checkpoint_dir(self.state.global_step)
        staged = checkpoints.staging_dir(final)
        self._staging_root = staged.parent

        def state_bytes() -> int:  # about what the checkpoint takes, when no checkpoint before it tells
            return checkpoints.tensor_bytes([model.state_dict(), self.optimizer.state_dict()])

        with checkpoints.disk_full_is_a_user_error(self.run, final, state_bytes):
            try:
                checkpoints.refuse_without_room(self.run, final, self.accelerator)
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            # Trainer recorded a new best checkpoint under its staging name.
            if self.state.best_model_checkpoint == str(staged):
                self.state.best_model_checkpoint = str(final)
                if self.args.should_save:
                    self.state.save_to_json(str(staged / checkpoints.TRAINER_STATE_FILE))
            self._save_log_window(staged)
            self.accelerator.wait_for_everyone()  # every process has written its RNG state
            if self.args.should_save:
                checkpoints.publish(staged, final)
        if self.args.should_save:
            # The best is only ever an evaluated checkpoint: Trainer moves it at evaluations alone.
            checkpoints.prune(self.run, self.training.keep_checkpoints, self.state.best_model_checkpoint)
            checkpoints.clear_staging(self.run)
        self.accelerator.wait_for_everyone()  # and finds the checkpoint under its final name
        self.save_timer.restart()

    # Trainer's training loss since its last log, which its checkpoints leave out: a run resumed
    # from a checkpoint between two logs would log the mean over the steps after the checkpoint only.
    LOG_WINDOW = "log_window_{process}.json"

    def _save_log_window(self, staged: Path) -> None:
        window = {"loss_sum": float(self._tr_loss), "last_logged_step": self._globalstep_last_logged}
        atomic_write_json(staged / self.LOG_WINDOW.format(process=self.args.process_index), window)

    def restore_log_window(self, checkpoint: Path) -> None:
        """Continue the logging window the checkpoint was saved in (Trainer sets it to zero at the start)."""
        saved = checkpoint / self.LOG_WINDOW.format(process=self.args.process_index)
        if saved.is_file():  # absent in checkpoints of ftcli before 2026-12
            window = json.loads(saved.read_text())
            self._tr_loss = torch.tensor(window["loss_sum"], device=self.args.device)
            self._globalstep_last_logged = window["last_logged_step"]


def _extra_save_every(config: Config, has_validation: bool) -> int | None:
    """The save_every steps that Trainer's own save schedule (at every evaluation) leaves out, or None."""
    training = config.training
    return training.save_every if has_validation and training.saves_at_evaluations else None  # type: ignore[return-value]


class _ExtraSaves(TrainerCallback):
    """Saves beyond Trainer's schedule: training.save_every_minutes, and the save_every steps between
    evaluations when Trainer saves at each evaluation. Trainer evaluates before it saves in a step,
    so a save asked for here at an evaluated step still records that step's score. A resumed run
    continues the logging window its checkpoint was saved in."""

    def __init__(self, trainer: _StagedTrainer, save_every: int | None) -> None:
        self.trainer, self.timer, self.save_every = trainer, trainer.save_timer, save_every

    def on_train_begin(self, args, state, control, **kwargs):
        self.timer.restart()  # minutes of training, not of setting up
        if self.trainer.job.resume_from is not None:
            self.trainer.restore_log_window(self.trainer.job.resume_from)

    def on_step_end(self, args, state, control, **kwargs):
        timed = self.timer.due(state.global_step)  # every process, every step: it may broadcast
        if timed or (self.save_every is not None and state.global_step % self.save_every == 0):
            control.should_save = True


def _batched_metrics(config: Config, label_names: list[str], objective: Objective):
    """compute_metrics for batch_eval_metrics=True: accumulate each batch's predictions (and
    probabilities when a metric needs them), compute on the last batch."""
    suite = MetricSuite(config.metrics, label_names, config.task)

    def compute_metrics(prediction, compute_result: bool = True) -> dict[str, float]:
        logits = torch.as_tensor(prediction.predictions)
        labels = torch.as_tensor(prediction.label_ids)
        scores = objective.scores(logits).cpu().numpy() if suite.needs_scores else None
        suite.add_batch(objective.predictions(logits), labels.cpu().numpy(), scores)
        return suite.compute() if compute_result else {}

    return compute_metrics


class _EventCallback(TrainerCallback):
    """Trainer's logs into metrics.jsonl (ftcli's key names) and onto ftcli's progress bar."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self.stop_requested = False  # by on_evaluate (a sweep's pruner), at an evaluation's log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.job.events.start(state.max_steps, initial_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.job.events.step(state.global_step, samples)
        # A signal: save this step and stop (the loop backend does the same).
        if state.global_step < state.max_steps and self.job.stop_signals.requested(state.global_step):
            control.should_save = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        event = {"step": state.global_step, "epoch": round(float(state.epoch or 0.0), 4)}
        for key, value in logs.items():
            if key in LOG_KEYS:
                event[LOG_KEYS[key]] = float(value)
            elif key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                event[key] = float(value)
        if len(event) > 2:
            self.stop_requested = self.job.log(event) or self.stop_requested

    def on_evaluate(self, args, state, control, **kwargs):
        if self.stop_requested:  # e.g. a sweep pruned this trial: end here, as early stopping does
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.job.events.stop()
