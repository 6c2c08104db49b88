"""Everything the loop needs before its first step: Accelerate, the optimizer and its schedule,
the state to start or resume from, the step (eager or graphed), evaluation and the checkpoint
writer, gathered in one Loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from datasets import Dataset
from torch.utils.data import DataLoader

from ftcli.config import TrainingConfig
from ftcli.data.batching import DeviceTensors, column
from ftcli.errors import FtcliError
from ftcli.metrics import MetricSuite
from ftcli.training.job import TrainJob
from ftcli.training.loop.checkpointing import CheckpointWriter, load_checkpoint
from ftcli.training.loop.evaluation import evaluation_loader
from ftcli.training.loop.graphs import GraphedTrainStep, length_buckets
from ftcli.training.loop.plan import BatchPlan, LoopState
from ftcli.training.loop.steps import EagerStep, GraphedStep
from ftcli.objective import Objective
from ftcli.training.optim import build_scheduler, create_optimizer, parameter_groups
from ftcli.training.stopping import LossWatch
from ftcli.training.timed_saves import SaveTimer

if TYPE_CHECKING:
    from ftcli.training.loop.fused import FusedLayers

# Fused kernels take 0.3-0.45 ms off each step (H200: MiniLM, bert-base at batch 8) and cost 0.5 s
# of capture with Triton's cache warm, 4-7 s on a machine's first run: from about 2,000 steps on
# they pay for themselves once the cache is warm.
FUSED_KERNELS_MIN_STEPS = 2000
DEVICE_DATA_LIMIT_BYTES = 1 << 30  # MRPC padded is ~10 MB; a split this large leaves the GPU to the model
EAGER_NOT_FUSED = "eager steps: the fused kernels run only inside a CUDA graph step"

# The run's autocast dtype in Accelerate's words.
MIXED_PRECISION = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Loop:
    """One training run of the loop backend, as set up; the loop's functions read and advance it."""

    job: TrainJob
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective  # on the device
    plan: BatchPlan
    total_steps: int
    state: LoopState
    step: EagerStep | GraphedStep
    checkpoints: CheckpointWriter
    eval_loader: DataLoader | None
    suite: MetricSuite
    # The logging window in progress: train loss summed over this process's examples, and their count.
    window: torch.Tensor
    loss_watch: LossWatch
    capture_seconds: float | None = None  # graphed runs: how long capturing the graphs took
    not_fused: str = ""  # why no fused kernels, or why only some chains are (metrics.json's kernels record)
    save_timer: SaveTimer = field(default_factory=lambda: SaveTimer(None))  # training.save_every_minutes
    started: float = field(default_factory=time.perf_counter)
    stopped_early: bool = False

    @property
    def training(self) -> TrainingConfig:
        return self.job.config.training

    @property
    def graphed(self) -> bool:
        return isinstance(self.step, GraphedStep)


def build_loop(job: TrainJob, graphs: bool) -> Loop:
    """The loop ready for its first step (or the step after its checkpoint)."""
    training, runtime = job.config.training, job.runtime
    accelerator = _accelerator(training, runtime.device, runtime.autocast_dtype, graphs)
    train_set = job.prepared.splits["train"]
    plan = _plan(training, train_set, accelerator.num_processes)
    total_steps = training.max_steps or math.ceil(training.epochs * plan.steps_per_epoch)
    # The scheduler is stepped by hand, once per optimizer step: prepared by Accelerate, it would
    # advance once per process.
    optimizer = create_optimizer(
        parameter_groups(job.model, training.weight_decay), training, runtime.device, capturable=graphs
    )
    scheduler = build_scheduler(optimizer, training, total_steps)
    if graphs:
        # One process, and the graphs autocast for themselves: Accelerate has nothing to wrap. (It
        # also marks a model it prepares and never prepares it again, which would leave the
        # eager retry after a failed capture without autocast.)
        model, optimizer = job.model.to(accelerator.device), accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(job.model, optimizer)
    validation = job.prepared.splits.get("validation")
    eval_loader = None
    if validation is not None:
        eval_loader = accelerator.prepare(evaluation_loader(validation, training.eval_batch_size, job.tokenizer.pad_token_id))
    suite = MetricSuite(job.config.metrics, job.prepared.label_names, job.config.task)
    state = _start_state(job, accelerator, model, optimizer, scheduler)
    objective = job.objective.to(accelerator.device)
    fused, not_fused = fused_layers(training, accelerator.unwrap_model(model), total_steps) if graphs else (None, EAGER_NOT_FUSED)
    step, capture_seconds = _step(job, accelerator, model, optimizer, scheduler, objective, plan, graphs, fused)
    checkpoints = CheckpointWriter(job.run, accelerator, training.keep_checkpoints)
    checkpoints.reserve(model, optimizer, scheduler)
    # The logging window in progress at the checkpoint, summed over processes, continues on the main one.
    window = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    if accelerator.is_main_process:
        window += torch.tensor([state.window_loss, state.window_examples], dtype=torch.float64, device=window.device)
    return Loop(
        job, accelerator, model, optimizer, scheduler, objective, plan, total_steps, state, step, checkpoints,
        eval_loader, suite, window, LossWatch(accelerator.device), capture_seconds, not_fused,
        save_timer=SaveTimer(training.save_every_minutes),
    )


def _accelerator(
    training: TrainingConfig, device: torch.device, dtype: torch.dtype | None, graphs: bool
) -> Accelerator:
    # One process may train several times (sweeps, benchmarks), each run with its own precision;
    # the distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=device.type == "cpu",
        # A CUDA graph step does its own autocast: Accelerate's would cache casts across the capture.
        mixed_precision="no" if graphs else MIXED_PRECISION[dtype],
        gradient_accumulation_steps=training.grad_accum,
    )


def _plan(training: TrainingConfig, train_set: Dataset, num_processes: int) -> BatchPlan:
    if len(train_set) < num_processes:
        raise FtcliError(
            f"the training set has {len(train_set)} examples, fewer than the {num_processes} processes",
            "train on more data or with fewer processes",
        )
    return BatchPlan(
        len(train_set),
        training.batch_size * num_processes,
        training.grad_accum,
        training.seed,
        num_processes,
        lengths=np.asarray(column(train_set, "length")) if training.group_by_length else None,
    )


def _start_state(job: TrainJob, accelerator: Accelerator, model, optimizer, scheduler) -> LoopState:
    """A fresh state, or the checkpoint's, with weights, optimizer, schedule and RNGs restored."""
    if job.resume_from is None:
        return LoopState(num_processes=accelerator.num_processes)
    state = LoopState(**load_checkpoint(job.resume_from, accelerator, model, optimizer, scheduler))
    if state.num_processes != accelerator.num_processes:
        raise FtcliError(
            f"{job.resume_from} was written by {state.num_processes} processes, this run has {accelerator.num_processes}",
            "resume with the number of processes the run was started with",
        )
    return state


def _step(
    job, accelerator, model, optimizer, scheduler, objective, plan, graphs: bool, fused: FusedLayers | None
) -> tuple[EagerStep | GraphedStep, float | None]:
    """The step callable (a graphed one with `fused` layers), and for a graphed one how long
    capturing took. Fast paths: the training set padded once on the GPU, and each step replayed as
    a CUDA graph that gathers its own batch from it."""
    training, train_set = job.config.training, job.prepared.splits["train"]
    pad_token_id = job.tokenizer.pad_token_id
    data: Dataset | DeviceTensors = train_set
    if graphs or keep_on_device(training, train_set, accelerator.device):
        data = DeviceTensors(train_set, pad_token_id, accelerator.device, training.resolved_pad_multiple(accelerator.device.type))
    if not graphs:
        return EagerStep(accelerator, model, optimizer, scheduler, objective, training, plan, data, pad_token_id), None
    unwrapped = accelerator.unwrap_model(model)
    graphed = GraphedTrainStep(
        unwrapped, optimizer.optimizer, data, training.batch_size, length_buckets(data.width),
        training.max_grad_norm, job.runtime.autocast_dtype, objective, fused,
    )
    model.train()
    capture_started = time.perf_counter()
    graphed.capture()
    return GraphedStep(graphed, scheduler, data), time.perf_counter() - capture_started


def fused_layers(training: TrainingConfig, model: torch.nn.Module, total_steps: int) -> tuple[FusedLayers | None, str]:
    """The fused kernels for the model's BERT-family layers, when training.fused_kernels asks for
    them (auto: a run of FUSED_KERNELS_MIN_STEPS steps or more, counting all its steps, so that a
    resumed run takes the kernels it started with), Triton is installed (CUDA builds of torch bring
    it) and the model has any; and why not, or why only some of its layers (metrics.json)."""
    wanted = training.fused_kernels
    if wanted is False:
        return None, "training.fused_kernels: false"
    if wanted == "auto" and total_steps < FUSED_KERNELS_MIN_STEPS:
        return None, f"training.fused_kernels: auto fuses runs of {FUSED_KERNELS_MIN_STEPS} steps or more, this one has {total_steps}"
    try:
        from ftcli.training.loop.fused import BERT_FAMILIES, FusedLayers  # Triton: only for a graphed step
    except ImportError:
        return None, "Triton is not installed"
    fused = FusedLayers(model)
    chains = "BERT-family (" + ", ".join(BERT_FAMILIES) + ") bias-GELU and bias-dropout-residual-LayerNorm chains"
    if not len(fused):
        return None, f"no BERT-family block to fuse: the kernels cover {chains} whose Linear is plain (not LoRA-adapted)"
    return fused, f"the rest runs PyTorch's kernels: only {chains} whose Linear is plain (not LoRA-adapted) are fused"


def why_eager(training: TrainingConfig, train_set: Dataset, device: torch.device) -> str:
    """Why training.compile does not replay CUDA graphs here, or "" where it can: one CUDA process,
    no accumulation, PyTorch's AdamW. Elsewhere the same config trains eagerly, so it runs unchanged
    on a laptop. auto also needs the training set to fit on the GPU, where the graph gathers its batches."""
    processes = PartialState().num_processes
    reasons = [
        (training.compile == "none", "training.compile: none"),
        (device.type != "cuda", device.type),
        (processes > 1, f"{processes} processes (CUDA graphs: one)"),
        (training.grad_accum > 1, f"training.grad_accum: {training.grad_accum} (CUDA graphs: 1)"),
        (training.optimizer != "adamw", f"training.optimizer: {training.optimizer} (CUDA graphs: adamw)"),
        (training.compile == "auto" and training.data_on_device is False, "auto: training.data_on_device: false"),
    ]
    for applies, reason in reasons:
        if applies:
            return reason
    if training.compile == "auto" and not fits_on_device(train_set):
        return "auto: the training set is too large to keep on the GPU"
    return ""


def family_why_eager(model: torch.nn.Module) -> str:
    """Why this model's step is not worth trying to capture, or "": flash-attn's variable-length
    path (a model loaded with flash_attention_2, as ModernBERT is on CUDA where flash-attn is
    installed) reads each batch's longest sequence back to the host (transformers' _upad_input:
    .item()), which a CUDA graph cannot hold, so the capture would fail after its warm-up steps."""
    attention = str(getattr(model.config, "_attn_implementation", ""))
    if attention.startswith("flash_attention"):
        return f"{attention} unpads each batch by lengths read on the host, which a CUDA graph cannot capture"
    return ""


def fits_on_device(train_set: Dataset) -> bool:
    return DeviceTensors.nbytes_for(train_set) < DEVICE_DATA_LIMIT_BYTES


def keep_on_device(training: TrainingConfig, train_set: Dataset, device: torch.device) -> bool:
    if training.data_on_device == "auto":
        return device.type == "cuda" and fits_on_device(train_set)
    return bool(training.data_on_device)
