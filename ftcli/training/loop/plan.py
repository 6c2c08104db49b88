"""Which examples each step trains on, and the counters a checkpoint saves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ftcli.data.batching import length_grouped_order


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
