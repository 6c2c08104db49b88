"""A whole training step (forward, backward, clipping, AdamW) replayed as one CUDA graph.

At batch 8 a BERT step is launch-bound: the host spends ~40 ms issuing kernels that the GPU runs
in a few. Capturing the step once per padded length (a small set of static buckets) and
replaying it removes that overhead. The optimizer must be built with `capturable=True` and a
tensor learning rate, so the schedule changes the rate in place and the graph reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_IGNORE_INDEX = -100  # rows added to fill a short last batch carry this label: no loss, no gradient


def length_buckets(max_length: int, smallest: int = 32, step: int = 16) -> list[int]:
    """Static sequence lengths to capture: 32, 48, ... up to max_length (which is always one)."""
    buckets = list(range(smallest, max_length, step))
    return [length for length in buckets if length < max_length] + [max_length]


class GraphedTrainStep:
    """Call with a padded batch on the device; returns the step's summed loss and gradient norm
    as tensors that the next call overwrites: accumulate them, don't keep them."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        buckets: list[int],
        max_grad_norm: float | None,
        autocast_dtype: torch.dtype | None,
        pad_token_id: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.buckets = sorted(buckets)
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inverse_rows = torch.ones((), device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------ the step itself
    def _step(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager loop's step: summed cross-entropy, scaled to the mean over the real rows."""
        self.optimizer.zero_grad(set_to_none=False)  # gradients must stay the same tensors
        features = {key: value for key, value in inputs.items() if key != "labels"}
        # The autocast cache would hold casts made during capture: graphs need it off.
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self.model(**features).logits
        loss_sum = F.cross_entropy(logits.float(), inputs["labels"], reduction="sum", ignore_index=LOSS_IGNORE_INDEX)
        (loss_sum * self._inverse_rows).backward()
        if self.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm, foreach=True)
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.optimizer.step()
        return loss_sum.detach(), grad_norm

    # ------------------------------------------------------------ capture
    def capture(self, token_type_ids: bool = True, warmup_steps: int = 3) -> None:
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
        pool = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for length in sorted(self.buckets, reverse=True):
            inputs = self._static_inputs(length, token_type_ids)
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    self._step(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[length] = self._step(inputs)
            pool = graph.pool()
            self._graphs[length] = graph
            self._inputs[length] = inputs
        torch.cuda.synchronize()
        self._restore_optimizer_state(saved_state)
        for group, rate in zip(self.optimizer.param_groups, learning_rates):
            group["lr"].copy_(rate)

    def _static_inputs(self, length: int, token_type_ids: bool) -> dict[str, torch.Tensor]:
        shape = (self.batch_size, length)
        inputs = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long, device=self.device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=self.device),
            "labels": torch.zeros(self.batch_size, dtype=torch.long, device=self.device),
        }
        if token_type_ids:
            inputs["token_type_ids"] = torch.zeros(shape, dtype=torch.long, device=self.device)
        return inputs

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
    def bucket_for(self, length: int) -> int:
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise ValueError(f"sequence length {length} exceeds the largest bucket {self.buckets[-1]}")

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step on a batch of at most batch_size rows; returns (summed loss, grad norm)."""
        rows, length = batch["input_ids"].shape
        bucket = self.bucket_for(length)
        static = self._inputs[bucket]
        # Fill the static buffers: real rows first, the rest padding with ignored labels.
        static["input_ids"].fill_(self.pad_token_id)
        static["attention_mask"].zero_()
        static["labels"].fill_(LOSS_IGNORE_INDEX)
        static["input_ids"][:rows, :length].copy_(batch["input_ids"], non_blocking=True)
        static["attention_mask"][:rows, :length].copy_(batch["attention_mask"], non_blocking=True)
        static["labels"][:rows].copy_(batch["labels"], non_blocking=True)
        if "token_type_ids" in static:
            static["token_type_ids"].zero_()
            if "token_type_ids" in batch:
                static["token_type_ids"][:rows, :length].copy_(batch["token_type_ids"], non_blocking=True)
        if rows < self.batch_size:
            # A fully masked row makes attention softmax over nothing (NaN); let padding rows see one token.
            static["attention_mask"][rows:, 0] = 1
        self._inverse_rows.fill_(1.0 / rows)
        self._graphs[bucket].replay()
        return self._outputs[bucket]
