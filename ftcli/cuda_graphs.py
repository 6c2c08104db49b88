"""A whole training step (forward, backward, clipping, AdamW) replayed as one CUDA graph.

At batch 8 a BERT step is launch-bound: the host spends ~40 ms issuing kernels that the GPU runs
in 6.4 ms (bert-base on an H200, measured: about 1,000 small kernels). Capturing the step once
per padded length (a small set of static buckets) and replaying it removes that overhead. The
optimizer must be built with `capturable=True` and a tensor learning rate, so the schedule
changes the rate in place and the graph reads it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftcli.data import DeviceTensors

LOSS_IGNORE_INDEX = -100  # rows added to fill a short last batch carry this label: no loss, no gradient


def length_buckets(max_length: int, smallest: int = 32, step: int = 16) -> list[int]:
    """Static sequence lengths to capture: 32, 48, ... up to max_length (which is always one)."""
    return list(range(smallest, max_length, step)) + [max_length]


class GraphedTrainStep:
    """Call with a batch's row indices into the training set; returns the step's summed loss and
    gradient norm as tensors that the next call overwrites: accumulate them, don't keep them.

    The graph gathers its batch itself from the training set kept on the GPU (DeviceTensors), so a
    step costs the host one small copy of row indices and one replay: nothing to collate, fill or
    synchronise, and the host runs ahead of the GPU.

    The gradients live in one flat buffer (each parameter's .grad is a view of it): zeroing,
    the norm and clipping each run as one kernel.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: DeviceTensors,
        batch_size: int,
        buckets: list[int],
        max_grad_norm: float | None,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.batch_size = batch_size
        self.buckets = sorted(buckets)
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._gradients = torch.zeros(
            sum(p.numel() for p in self.parameters), dtype=self.parameters[0].dtype, device=self.device
        )
        offset = 0
        for parameter in self.parameters:
            parameter.grad = self._gradients[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        # The batch's row indices; -1 marks a slot of a short last batch (no loss, no gradient).
        self._rows = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------ the step itself
    def _step(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager loop's step on the rows in self._rows, padded to `length`: summed
        cross-entropy, its gradient the mean over the real rows."""
        self._gradients.zero_()  # in place: backward accumulates into the views, the graph keeps them
        real = self._rows >= 0
        rows = self._rows.clamp(min=0)  # an empty slot repeats row 0, whose loss is ignored below
        features = {
            name: values.index_select(0, rows)[:, :length]
            for name, values in self.data.tensors.items()
            if name != "labels"
        }
        labels = torch.where(real, self.data.tensors["labels"].index_select(0, rows), LOSS_IGNORE_INDEX)
        # The autocast cache would hold casts made during capture: graphs need it off.
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self.model(**features).logits
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=LOSS_IGNORE_INDEX)
        (loss_sum / real.sum()).backward()
        grad_norm = self._gradients.norm()
        if self.max_grad_norm:  # as clip_grad_norm_ does it
            self._gradients.mul_((self.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0))
        self.optimizer.step()
        return loss_sum.detach(), grad_norm

    # ------------------------------------------------------------ capture
    def capture(self, warmup_steps: int = 2) -> None:
        """Warm up and capture one graph per bucket, longest first so one memory pool serves all.

        Warm-up runs real optimizer steps, so they run at learning rate 0 and the optimizer's
        state (moments, step counts) is put back afterwards, in place, since the graphs read
        those very tensors: training starts (or resumes) from the same weights and state.
        """
        learning_rates = [group["lr"].clone() for group in self.optimizer.param_groups]
        saved_state = {
            parameter: {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
            for parameter, state in self.optimizer.state.items()
        }
        for group in self.optimizer.param_groups:
            group["lr"].fill_(0.0)
        self._rows.copy_(torch.arange(self.batch_size) % len(self.data.lengths))
        pool = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for length in sorted(self.buckets, reverse=True):
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    self._step(length)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[length] = self._step(length)
            pool = graph.pool()
            self._graphs[length] = graph
        torch.cuda.synchronize()
        self._restore_optimizer_state(saved_state)
        for group, rate in zip(self.optimizer.param_groups, learning_rates):
            group["lr"].copy_(rate)

    def _restore_optimizer_state(self, saved: dict) -> None:
        """State that existed before warm-up (a resumed run's) is copied back; state that warm-up
        created (a fresh run's) is zeroed, as a fresh optimizer's would be."""
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    if parameter in saved and key in saved[parameter]:
                        value.copy_(saved[parameter][key])
                    else:
                        value.zero_()

    # ------------------------------------------------------------ replay
    def bucket_for(self, rows: np.ndarray) -> int:
        length = int(self.data.lengths[rows].max())
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise ValueError(f"sequence length {length} exceeds the largest bucket {self.buckets[-1]}")

    def padded_tokens(self, rows: np.ndarray) -> int:
        """Tokens the step computes for these rows, padding and empty slots included."""
        return self.batch_size * self.bucket_for(rows)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on at most batch_size rows of the training set; returns (summed loss, grad norm)."""
        slots = np.full(self.batch_size, -1, dtype=np.int64)
        slots[: len(rows)] = rows
        # Pinned, so the copy is asynchronous; it is ordered after the previous replay on the stream.
        self._rows.copy_(torch.from_numpy(slots).pin_memory(), non_blocking=True)
        bucket = self.bucket_for(rows)
        self._graphs[bucket].replay()
        return self._outputs[bucket]
