"""Backend `loop`: ftcli's own training loop on Accelerate, readable top to bottom.

The Hugging Face course's loop (prepare, accumulate, backward, clip, step, schedule, evaluate
through gather_for_metrics), made exact and resumable:

- an epoch's data order is a permutation seeded by (seed, epoch), cut into global micro-batches
  that the processes share; a resumed run slices it where its checkpoint stopped instead of
  replaying the batches already trained on;
- each optimizer step's gradient is the mean over exactly the examples it trained on, whatever
  the accumulation, the number of processes, or a shorter last batch;
- a checkpoint holds the weights, optimizer, schedule, scaler, every RNG and the loop's counters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.data_loader import DataLoaderShard
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ftcli import checkpoint
from ftcli.backends import LossWatch, TrainJob, TrainOutcome
from ftcli.config import TrainingConfig
from ftcli.cuda_graphs import CaptureFailed, GraphedTrainStep, length_buckets
from ftcli.data import DeviceTensors, collate, length_grouped_order, length_sorted_batches
from ftcli.errors import FtcliError
from ftcli.inference import attention_kernels, autocast_dtype, pick_device, score
from ftcli.metrics import MetricSuite
from ftcli.optim import create_optimizer

log = logging.getLogger("ftcli")

DEVICE_DATA_LIMIT_BYTES = 1 << 30  # MRPC padded is ~10 MB; a split this large leaves the GPU to the model

# ftcli's precision setting, resolved for the device (ftcli.inference), in Accelerate's words.
MIXED_PRECISION = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class LoopState:
    """The loop's counters and records; every checkpoint saves them as training_state.json."""

    optimizer_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # global micro-batches of `epoch` already trained on
    examples_seen: int = 0
    best_score: float | None = None  # best evaluation so far, for early stopping
    evaluations_without_improvement: int = 0
    best_checkpoint: str | None = None  # the best-scoring checkpoint, kept at the end
    best_checkpoint_score: float | None = None
    window_loss: float = 0.0  # train loss summed since the last log, over window_examples examples
    window_examples: int = 0
    num_processes: int = 1


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each micro-batch and optimizer step train on: a function of the seed and the
    epoch only, so a run can resume anywhere without replaying what came before."""

    num_examples: int
    global_batch_size: int  # batch_size × processes
    grad_accum: int
    seed: int
    num_processes: int
    lengths: np.ndarray | None = field(default=None, compare=False)  # set: group batches by length

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        if self.lengths is not None:
            order = length_grouped_order(self.lengths, order, self.global_batch_size)
        size = self.global_batch_size
        batches = [order[start : start + size] for start in range(0, self.num_examples, size)]
        # Every process needs an example of each micro-batch: a tail too small to share joins the batch before.
        if len(batches) > 1 and len(batches[-1]) < self.num_processes:
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.epoch_batches(0)) / self.grad_accum)

    def share(self, batch: np.ndarray, process_index: int) -> np.ndarray:
        """One process's part of a global micro-batch."""
        return np.array_split(batch, self.num_processes)[process_index]

    def step_examples(self, batches: list[np.ndarray], index: int) -> int:
        """Examples, over all processes, of the optimizer step that micro-batch `index` belongs to."""
        first = index - index % self.grad_accum
        return sum(len(batch) for batch in batches[first : first + self.grad_accum])


class LoopBackend:
    def train(self, job: TrainJob) -> TrainOutcome:
        device = pick_device()
        training = job.config.training
        if use_cuda_graphs(training, job.prepared.splits["train"], device):
            try:
                # A graphed run trains without cuDNN's attention, which plans anew for every input shape
                # (measured: capture 1.1 s instead of 2.1 s, the same step time). Eager steps keep it:
                # the trainer backend measured 1.10x of HF Trainer at batch 8 with it, 0.82-0.92x
                # without (in different runs, not isolated in one). Evaluation goes without it either way.
                with attention_kernels(device):
                    return self._train(job, device, graphs=True)
            except CaptureFailed as failure:
                if training.compile == "cuda_graphs":
                    raise FtcliError(
                        f"this model's training step cannot be captured as a CUDA graph ({failure})",
                        "set training.compile: auto (falls back to eager steps) or none",
                    ) from None
                reason = str(failure)
            # Outside the except clause, so that the failed attempt's tensors are freed first.
            log.warning("training with eager steps: this model's step cannot be captured as a CUDA graph (%s)", reason)
        return self._train(job, device, graphs=False)

    def _train(self, job: TrainJob, device: torch.device, graphs: bool) -> TrainOutcome:
        config, training = job.config, job.config.training
        dtype = autocast_dtype(training.precision, device)
        # One process may train several times (sweeps, benchmarks), each run with its own precision;
        # the distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        accelerator = Accelerator(
            cpu=device.type == "cpu",
            # A CUDA graph step does its own autocast: Accelerate's would cache casts across the capture.
            mixed_precision="no" if graphs else MIXED_PRECISION[dtype],
            gradient_accumulation_steps=training.grad_accum,
        )
        train_set = job.prepared.splits["train"]
        validation = job.prepared.splits.get("validation")
        if len(train_set) < accelerator.num_processes:
            raise FtcliError(
                f"the training set has {len(train_set)} examples, fewer than the {accelerator.num_processes} processes",
                "train on more data or with fewer processes",
            )
        plan = BatchPlan(
            len(train_set),
            training.batch_size * accelerator.num_processes,
            training.grad_accum,
            training.seed,
            accelerator.num_processes,
            lengths=np.asarray(train_set["length"]) if training.group_by_length else None,
        )
        total_steps = training.max_steps or math.ceil(training.epochs * plan.steps_per_epoch)

        # Optimizer and schedule. The scheduler is stepped by hand, once per optimizer step:
        # prepared by Accelerate, it would advance once per process.
        optimizer = create_optimizer(
            parameter_groups(job.model, training.weight_decay), training, device, capturable=graphs
        )
        scheduler = get_scheduler(
            training.scheduler,
            optimizer,
            num_warmup_steps=math.ceil(training.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        if graphs:
            # One process, and the graphs autocast for themselves: Accelerate has nothing to wrap. (It
            # also marks a model it prepares and never prepares it again, which would leave the
            # eager retry after a failed capture without autocast.)
            model, optimizer = job.model.to(accelerator.device), accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(job.model, optimizer)
        pad_token_id = job.tokenizer.pad_token_id
        class_weights = job.class_weights.to(accelerator.device) if job.class_weights is not None else None
        eval_loader = None
        if validation is not None:
            eval_loader = accelerator.prepare(evaluation_loader(validation, training.eval_batch_size, pad_token_id))
        suite = MetricSuite(config.metrics, num_labels=len(job.prepared.label_names))
        greater_is_better = suite.primary != "loss"

        state = LoopState(num_processes=accelerator.num_processes)
        if job.resume_from is not None:
            state = LoopState(**checkpoint.load_checkpoint(job.resume_from, accelerator, model, optimizer, scheduler))
            if state.num_processes != accelerator.num_processes:
                raise FtcliError(
                    f"{job.resume_from} was written by {state.num_processes} processes, this run has {accelerator.num_processes}",
                    "resume with the number of processes the run was started with",
                )
        # Fast paths: the training set padded once on the GPU, and each step replayed as a CUDA graph
        # that gathers its own batch from it.
        pad_multiple = training.resolved_pad_multiple(device.type)
        on_device = None
        if graphs or keep_on_device(training, train_set, device):
            on_device = DeviceTensors(train_set, pad_token_id, accelerator.device, pad_multiple)
        graphed = None
        if graphs:
            graphed = GraphedTrainStep(
                accelerator.unwrap_model(model), optimizer.optimizer, on_device, training.batch_size,
                length_buckets(on_device.width), training.max_grad_norm, dtype, class_weights,
            )
            model.train()
            capture_started = time.perf_counter()
            graphed.capture()
            capture_seconds = time.perf_counter() - capture_started

        checkpoints = checkpoint.CheckpointWriter(job.run, accelerator, training.keep_checkpoints)
        checkpoints.reserve(model, optimizer, scheduler)

        # The logging window in progress at the checkpoint, summed over processes, continues on the main one.
        window = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, examples
        if accelerator.is_main_process:
            window += torch.tensor([state.window_loss, state.window_examples], dtype=torch.float64, device=window.device)

        # Train: optimizer steps until total_steps, epoch after epoch; a resumed run enters its
        # epoch at the micro-batch its checkpoint stopped at.
        job.progress.start(total_steps, initial_step=state.optimizer_step)
        started = time.perf_counter()
        model.train()
        grad_norm = None
        real_tokens, padded_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device), 0  # this process's
        loss_watch = LossWatch(accelerator.device)
        finished, stopped_early = state.optimizer_step >= total_steps, False  # resumed at the end: nothing left
        batches = plan.epoch_batches(state.epoch)
        try:
            while not (finished or stopped_early):
                todo = batches[state.batches_done :]
                # The graph gathers each batch on the GPU from its row indices; the eager step gets them padded.
                if graphed is None:
                    shares = [plan.share(batch, accelerator.process_index) for batch in todo]
                    todo = train_loader(on_device or train_set, shares, accelerator.device, pad_token_id, pad_multiple)
                for batch in todo:
                    step_examples = plan.step_examples(batches, state.batches_done)
                    if graphed is not None:  # the same step as below, replayed as one graph
                        loss_sum, grad_norm = graphed(batch)
                        scheduler.step()
                        rows = len(batch)
                        real_tokens += int(on_device.lengths[batch].sum())
                        padded_tokens += graphed.padded_tokens(batch)
                    else:
                        with accelerator.accumulate(model):
                            labels = batch.pop("labels")
                            rows = len(labels)
                            real_tokens += batch["attention_mask"].sum()  # a device tensor: no sync
                            padded_tokens += batch["input_ids"].numel()
                            logits = model(**batch).logits.float()
                            loss_sum = F.cross_entropy(logits, labels, weight=class_weights, reduction="sum")
                            # accelerator.backward divides by grad_accum and DDP averages over processes: undo
                            # both, so the step's gradient is the mean over exactly the examples of the step.
                            accelerator.backward(loss_sum * (training.grad_accum * accelerator.num_processes / step_examples))
                            if accelerator.sync_gradients:
                                if training.max_grad_norm:
                                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
                                optimizer.step()
                                if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
                                    scheduler.step()
                                optimizer.zero_grad(set_to_none=True)
                    window[0] += loss_sum.detach()
                    loss_watch.observe(loss_sum, state.optimizer_step + 1)
                    window[1] += rows
                    state.batches_done += 1
                    if graphed is None and not accelerator.sync_gradients:
                        continue

                    # One optimizer step done.
                    state.optimizer_step += 1
                    state.examples_seen += step_examples
                    job.progress.step(state.optimizer_step, step_examples)
                    epoch_ended = state.batches_done == len(batches)
                    if epoch_ended:
                        state.epoch, state.batches_done = state.epoch + 1, 0
                    epoch = round(state.epoch + state.batches_done / len(batches), 4)
                    finished = state.optimizer_step >= total_steps
                    interrupted = not finished and job.stop_signals.requested(state.optimizer_step)  # SIGINT, SIGTERM: save and stop
                    log_due = state.optimizer_step % training.logging_steps == 0
                    eval_due = eval_loader is not None and (due(training.eval_every, state.optimizer_step, epoch_ended) or finished)
                    save_due = due(training.save_every, state.optimizer_step, epoch_ended) or finished or interrupted
                    # A nan loss stops training before it is logged, evaluated or saved (a stop after
                    # evaluating saves too, but then eval_due was true).
                    if log_due or eval_due or save_due:
                        loss_watch.check(accelerator, job.run, settle_saves=checkpoints.close)

                    # Log: with the check above, the only host sync of a training step, every logging_steps steps.
                    if log_due:
                        loss, examples = accelerator.reduce(window.clone()).tolist()
                        event = {"step": state.optimizer_step, "epoch": epoch, "train_loss": loss / examples}
                        event["learning_rate"] = float(scheduler.get_last_lr()[0])
                        if grad_norm is not None:
                            event["grad_norm"] = float(grad_norm)
                        job.log(event)
                        window.zero_()

                    # Evaluate on schedule and at the end, so that every checkpoint has a score.
                    score = None
                    if eval_due:
                        metrics = evaluate(model, eval_loader, accelerator, suite, dtype if graphs else None)
                        job.log({"step": state.optimizer_step, "epoch": epoch} | {f"eval_{k}": v for k, v in metrics.items()})
                        score = metrics[suite.primary]
                        if improves(score, state.best_score, greater_is_better):
                            state.best_score, state.evaluations_without_improvement = score, 0
                        else:
                            state.evaluations_without_improvement += 1
                        patience = training.early_stopping_patience
                        out_of_patience = bool(patience) and state.evaluations_without_improvement >= patience
                        stopped_early = out_of_patience or job.stop_requested

                    # Checkpoint on schedule and at the end (written in the background); the best one
                    # and the newest ones are kept.
                    if save_due or stopped_early:
                        target = job.run.checkpoint_dir(state.optimizer_step)
                        if score is not None and improves(score, state.best_checkpoint_score, greater_is_better):
                            state.best_checkpoint, state.best_checkpoint_score = str(target), score
                        loss, examples = accelerator.reduce(window.clone()).tolist()
                        state.window_loss, state.window_examples = loss, int(examples)
                        checkpoints.save(target, model, job.tokenizer, optimizer, scheduler, asdict(state), state.best_checkpoint)
                    if interrupted:  # the except below waits for the checkpoint just started
                        raise job.stop_signals.interrupted(job.run, state.optimizer_step)
                    if finished or stopped_early:
                        break
                batches = plan.epoch_batches(state.epoch)
        except BaseException:
            checkpoints.close()  # what was saved is on disk before the error is reported
            raise
        # The last checkpoint is still being written: the recipe saves and scores the model meanwhile.
        job.settle_saves = checkpoints.close
        job.progress.stop()
        seconds = time.perf_counter() - started
        tokens = accelerator.reduce(torch.stack([real_tokens, torch.tensor(padded_tokens, device=real_tokens.device)]))

        # Keep the best checkpoint's weights when there was a validation split, else the last ones
        # (the model holds them already when the best is the last: the one still being written).
        job.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if state.best_checkpoint is not None and state.best_checkpoint != str(checkpoints.newest):
            checkpoints.wait_for(Path(state.best_checkpoint))
            checkpoint.load_weights(job.model, Path(state.best_checkpoint))
        return TrainOutcome(
            global_step=state.optimizer_step,
            epoch=state.epoch + state.batches_done / len(batches),
            train_seconds=seconds,
            train_samples=state.examples_seen,
            best_checkpoint=state.best_checkpoint,
            best_score=state.best_checkpoint_score,
            stopped_early=stopped_early,
            extra={"real_tokens": int(tokens[0]), "padded_tokens": int(tokens[1])}
            | ({"steps": "cuda_graphs", "capture_seconds": capture_seconds} if graphed is not None else {"steps": "eager"}),
        )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices; biases and LayerNorm weights (the 1-d tensors) get none."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]


def train_loader(
    dataset: Dataset | DeviceTensors,
    shares: list[np.ndarray],
    device: torch.device,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> DataLoaderShard:
    """This process's shares of the global micro-batches, padded and moved to the device.

    A DataLoaderShard is what accelerator.prepare returns: it tells accelerator.accumulate where the
    epoch ends, so a shorter last group of micro-batches still makes its optimizer step. It is built
    here because the batches are already this process's; prepare would shard them a second time.
    """
    if isinstance(dataset, DeviceTensors):
        # A batch is one gather on the device: the loader only hands the indices over.
        source, collate_fn = _Gather(dataset), _first
    else:
        source, collate_fn = dataset, partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    return DataLoaderShard(
        source,
        device=device,
        batch_sampler=[share.tolist() for share in shares],
        collate_fn=collate_fn,
        generator=private_generator(),
    )


class _Gather:
    """DataLoader dataset whose batched read is a DeviceTensors gather."""

    def __init__(self, tensors: DeviceTensors) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors.lengths)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        return [self.tensors.batch(np.asarray(indices))]


def _first(items: list):
    return items[0]


def use_cuda_graphs(training: TrainingConfig, train_set: Dataset, device: torch.device) -> bool:
    """training.compile=cuda_graphs where it can work: one CUDA process, no accumulation, PyTorch's
    AdamW. Elsewhere the same config trains eagerly, so it runs unchanged on a laptop. auto also
    needs the training set to fit on the GPU, where the graph gathers its batches."""
    if training.compile == "none":
        return False
    if training.compile == "auto" and (training.data_on_device is False or not fits_on_device(train_set)):
        return False
    single = PartialState().num_processes == 1
    return device.type == "cuda" and single and training.grad_accum == 1 and training.optimizer == "adamw"


def fits_on_device(train_set: Dataset) -> bool:
    return DeviceTensors.nbytes_for(train_set) < DEVICE_DATA_LIMIT_BYTES


def keep_on_device(training: TrainingConfig, train_set: Dataset, device: torch.device) -> bool:
    if training.data_on_device == "auto":
        return device.type == "cuda" and fits_on_device(train_set)
    return bool(training.data_on_device)


def evaluation_loader(dataset: Dataset, batch_size: int, pad_token_id: int) -> DataLoader:
    """Batches of similar lengths (little padding), longest first, as ftcli.inference evaluates."""
    order = np.concatenate(length_sorted_batches(dataset["length"], batch_size))
    return DataLoader(
        dataset.select(order),
        batch_size=batch_size,
        collate_fn=partial(collate, pad_token_id=pad_token_id),
        generator=private_generator(),
    )


def private_generator() -> torch.Generator:
    """A DataLoader draws a seed from this generator each time it starts iterating, and without
    one from torch's global generator, which dropout uses: a resumed run, starting its loader at
    another moment, would then continue with other dropout masks."""
    return torch.Generator().manual_seed(0)


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    suite: MetricSuite,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss and every metric over the validation split, each process scoring its share.

    autocast: a precision to apply here, when Accelerate does not (the CUDA-graph path)."""

    def gathered_batches():
        for batch in loader:
            labels = batch.pop("labels")
            with torch.autocast(accelerator.device.type, dtype=autocast, enabled=autocast is not None):
                logits = model(**batch).logits.float()
            # With several processes the last batch is topped up with repeated examples so that
            # every process has one; gather_for_metrics drops them, so each example counts once.
            yield accelerator.gather_for_metrics((logits, labels))

    model.eval()
    with torch.no_grad(), attention_kernels(accelerator.device):  # evaluation brings many shapes
        metrics = score(gathered_batches(), suite)
    model.train()
    return metrics


def due(every: str | int, optimizer_step: int, epoch_ended: bool) -> bool:
    return epoch_ended if every == "epoch" else optimizer_step % every == 0


def improves(score: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (score > best if greater_is_better else score < best)
