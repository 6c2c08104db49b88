"""One training step, two ways: eager (any device, any number of processes, accumulation) or
replayed as a CUDA graph (one GPU). Both take a micro-batch and say what it cost; the loop treats
them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderShard
from datasets import Dataset

from ftcli.config import TrainingConfig
from ftcli.data.batching import DOCUMENT_COLUMNS, TEACHER_COLUMNS, DeviceTensors, collate
from ftcli.training.flops import Fed
from ftcli.training.loop.evaluation import private_generator
from ftcli.training.loop.graphs import GraphedTrainStep
from ftcli.training.loop.plan import BatchPlan
from ftcli.objective import Objective


@dataclass
class MicroStep:
    loss_sum: torch.Tensor  # the micro-batch's summed training loss, on the device
    rows: int  # its examples on this process
    stepped: bool  # an optimizer step was taken after it


class EagerStep:
    """The HF course's step on Accelerate: forward and backward, and on the last micro-batch of
    an optimizer step clipping, AdamW and the schedule. Each process trains on its share of every
    global micro-batch, padded on the host (or gathered from the training set on the GPU)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        objective: Objective,
        training: TrainingConfig,
        plan: BatchPlan,
        data: Dataset | DeviceTensors,
        pad_token_id: int,
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.objective, self.training, self.plan, self.data = objective, training, plan, data
        self.pad_token_id = pad_token_id
        self.pad_multiple = training.resolved_pad_multiple(accelerator.device.type)
        self.grad_norm: torch.Tensor | None = None
        self.real_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)  # this process's
        self.fed = Fed()  # this process's

    def batches(self, global_batches: list[np.ndarray]) -> DataLoaderShard:
        shares = [self.plan.share(batch, self.accelerator.process_index) for batch in global_batches]
        return train_loader(self.data, shares, self.accelerator.device, self.pad_token_id, self.pad_multiple)

    def __call__(self, batch: dict[str, torch.Tensor], step_examples: int) -> MicroStep:
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            labels = batch.pop("labels")
            for column in DOCUMENT_COLUMNS:  # long_text window: each window trains with its own labels
                batch.pop(column, None)
            targets = {column: batch.pop(column) for column in TEACHER_COLUMNS if column in batch}  # a student's
            self.real_tokens += batch["attention_mask"].sum()  # a device tensor: no sync
            self.fed.add(*batch["input_ids"].shape)
            loss_sum = self.objective.training_loss_sum(self.model(**batch).logits, labels, **targets)
            # accelerator.backward divides by grad_accum and DDP averages over processes: undo
            # both, so the step's gradient is the mean over exactly the examples of the step.
            accelerator.backward(loss_sum * (self.training.grad_accum * accelerator.num_processes / step_examples))
            if accelerator.sync_gradients:
                self._optimizer_step()
        return MicroStep(loss_sum, len(labels), accelerator.sync_gradients)

    def _optimizer_step(self) -> None:
        if self.training.max_grad_norm:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class GraphedStep:
    """The same step replayed as one CUDA graph: the graph gathers the batch on the GPU from the
    row indices it is given, so the host copies a few indices and replays."""

    def __init__(
        self, graphed: GraphedTrainStep, scheduler: torch.optim.lr_scheduler.LRScheduler, data: DeviceTensors
    ) -> None:
        self.graphed, self.scheduler, self.data = graphed, scheduler, data
        self.grad_norm: torch.Tensor | None = None
        self.real_tokens = torch.zeros((), dtype=torch.long, device=graphed.device)
        self.fed = Fed()

    def batches(self, global_batches: list[np.ndarray]) -> list[np.ndarray]:
        return global_batches

    def __call__(self, rows: np.ndarray, step_examples: int) -> MicroStep:
        loss_sum, self.grad_norm = self.graphed(rows)
        self.scheduler.step()
        self.real_tokens += int(self.data.lengths[rows].sum())
        # The graph computes every slot of its batch at its bucket's length, empty slots and padding included.
        self.fed.add(self.graphed.batch_size, self.graphed.bucket_for(rows))
        return MicroStep(loss_sum, len(rows), True)


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
