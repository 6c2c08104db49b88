"""A whole training step (forward, backward, clipping, AdamW) replayed as one CUDA graph.

At batch 8 a BERT step is launch-bound: the host spends ~40 ms issuing kernels that the GPU runs
in 6.4 ms (bert-base on an H200, measured: about 1,000 small kernels). Capturing the step once
per padded length (a small set of static buckets) and replaying it removes that overhead. The
optimizer must be built with `capturable=True` and a tensor learning rate, so the schedule
changes the rate in place and the graph reads it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ftcli.data.batching import DeviceTensors
from ftcli.objective import Objective, clip_scale
from ftcli.runtime import end_failed_capture, first_cause

if TYPE_CHECKING:  # Triton is imported only where the fused kernels run
    from ftcli.training.loop.fused import FusedLayers


class CaptureFailed(Exception):
    """The model's training step cannot be captured as a CUDA graph (e.g. its forward reads a value
    back to the host). Nothing of the attempt remains: the weights, the optimizer's state, its
    learning rate and the CUDA generator are as they were before it."""


def length_buckets(max_length: int, smallest: int = 32, step: int = 16) -> list[int]:
    """Static sequence lengths to capture: 32, 48, ... up to max_length (which is always one)."""
    return list(range(smallest, max_length, step)) + [max_length]


def low_precision_copies(model: nn.Module, dtype: torch.dtype) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """The trainable parameters that autocast casts at every forward (those of Linear layers), by
    name, each with a leaf copy in `dtype` for the forward to run on instead."""
    copies: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                copy = parameter.detach().to(dtype).requires_grad_()
                copies[f"{module_name}.{name}" if module_name else name] = (parameter, copy)
    return copies


class GraphedTrainStep:
    """Call with a batch's row indices into the training set; returns the step's summed loss and
    gradient norm as tensors that the next call overwrites: accumulate them, don't keep them.

    The graph gathers its batch itself from the training set kept on the GPU (DeviceTensors), so a
    step costs the host one small copy of row indices and one replay: nothing to collate, fill or
    synchronise, and the host runs ahead of the GPU.

    Kernels saved: under autocast every Linear casts its fp32 weight and bias to bf16 at each
    forward, and backward casts their gradients back and adds every gradient into .grad. At batch
    8 those are ~500 of the step's ~1,000 tiny kernels. The graph instead runs the forward on
    low-precision copies of those parameters (the very casts autocast makes), refreshed by one
    multi-tensor copy after the optimizer step; backward writes every gradient into fresh memory,
    and one multi-tensor copy per dtype packs them into one flat buffer (each parameter's .grad is
    a view of it), where the norm and clipping are one kernel each. The arithmetic is the eager
    autocast step's.

    With `fused` (fused.FusedLayers), BERT's bias-GELU and bias-dropout-residual-LayerNorm chains
    run as Triton kernels in the captured step, each step drawing their dropout seed first.
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
        objective: Objective,
        fused: FusedLayers | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.batch_size = batch_size
        self.buckets = sorted(buckets)
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.objective = objective
        self.fused = fused
        self.device = next(model.parameters()).device
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._gradients = torch.zeros(
            sum(p.numel() for p in self.parameters), dtype=self.parameters[0].dtype, device=self.device
        )
        self._gradient_views = []
        offset = 0
        for parameter in self.parameters:
            self._gradient_views.append(self._gradients[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()
        self._copies = low_precision_copies(model, autocast_dtype) if autocast_dtype is not None else {}
        # The batch's row indices; -1 marks a slot of a short last batch (no loss, no gradient).
        self._rows = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------ the step itself
    def _step(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager loop's step on the rows in self._rows, padded to `length`: the summed training
        loss, its gradient the mean over the real rows."""
        for parameter in [*self.parameters, *(copy for _, copy in self._copies.values())]:
            parameter.grad = None  # so backward hands its gradient tensors over instead of adding them
        if self.fused is not None:
            self.fused.draw_seed()
        real = self._rows >= 0
        rows = self._rows.clamp(min=0)  # an empty slot repeats row 0, whose loss is ignored below
        features = {name: self.data.tensors[name].index_select(0, rows)[:, :length] for name in self.data.model_columns}
        labels, targets = self.data.labels(rows, length), self.data.targets(rows, length)  # targets: a student's
        overrides = {name: copy for name, (_, copy) in self._copies.items()}
        # The autocast cache would hold casts made during capture: graphs need it off.
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = torch.func.functional_call(self.model, overrides, args=(), kwargs=features).logits
        loss_sum = self.objective.training_loss_sum(logits, labels, real, **targets)  # empty slots: no loss, no gradient
        (loss_sum / real.sum()).backward()
        self._pack_gradients()
        grad_norm = self._gradients.norm()
        if self.max_grad_norm:
            self._gradients.mul_(clip_scale(grad_norm, self.max_grad_norm))
        self.optimizer.step()
        self._refresh_copies()
        return loss_sum.detach(), grad_norm

    def _refresh_copies(self) -> None:
        """The low-precision copies take the optimizer's new weights."""
        if self._copies:
            originals, copies = zip(*self._copies.values())
            with torch.no_grad():
                torch._foreach_copy_(list(copies), list(originals))

    def _pack_gradients(self) -> None:
        """Copy each gradient (a low-precision copy's cast back to fp32) into the parameter's view of
        the flat buffer, and make that view its .grad for the optimizer. A parameter the forward did
        not use keeps a zero gradient."""
        copy_of = {id(parameter): copy for parameter, copy in self._copies.values()}
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        for parameter, view in zip(self.parameters, self._gradient_views):
            gradient = copy_of.get(id(parameter), parameter).grad
            if gradient is not None:
                targets, sources = by_dtype.setdefault(gradient.dtype, ([], []))
                targets.append(view)
                sources.append(gradient)
            parameter.grad = view
        with torch.no_grad():
            for targets, sources in by_dtype.values():
                torch._foreach_copy_(targets, sources)

    # ------------------------------------------------------------ capture
    def capture(self, warmup_steps: int = 2) -> None:
        """Warm up and capture one graph per bucket, longest first so one memory pool serves all.
        The first bucket warms up with `warmup_steps` (lazy state: the optimizer's moments, library
        handles); every other bucket with one step, for its own shapes' kernels.

        Warm-up runs real optimizer steps, so they run at learning rate 0 and the optimizer's
        state (moments, step counts) is put back afterwards, in place, since the graphs read
        those very tensors: training starts (or resumes) from the same weights and state. Its
        dropout draws are undone too (the CUDA generator's state), so a resumed run's replays
        draw the masks the uninterrupted run drew.
        """
        rng_state = torch.cuda.get_rng_state(self.device)
        learning_rates = [group["lr"].clone() for group in self.optimizer.param_groups]
        saved_state = {
            parameter: {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
            for parameter, state in self.optimizer.state.items()
        }
        for group in self.optimizer.param_groups:
            group["lr"].fill_(0.0)
        self._rows.copy_(torch.arange(self.batch_size) % len(self.data.lengths))
        try:
            with self.fused.installed() if self.fused is not None else nullcontext():
                self._capture_buckets(warmup_steps)
        except CaptureFailed:
            self._graphs.clear()
            self._outputs.clear()
            for parameter in self.parameters:
                parameter.grad = None  # not views of the flat buffer: an eager step after this one owns them
            end_failed_capture(self.device)
            raise
        finally:
            torch.cuda.set_rng_state(rng_state, self.device)
            self._restore_optimizer_state(saved_state)
            for group, rate in zip(self.optimizer.param_groups, learning_rates):
                group["lr"].copy_(rate)

    def _capture_buckets(self, warmup_steps: int) -> None:
        pool = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for index, length in enumerate(sorted(self.buckets, reverse=True)):
            with torch.cuda.stream(side):
                for _ in range(warmup_steps if index == 0 else 1):
                    self._step(length)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[length] = self._step(length)
            except Exception as error:  # the warm-up ran the same step eagerly: only capturing it failed
                raise CaptureFailed(first_cause(error)) from error
            pool = graph.pool()
            self._graphs[length] = graph
        torch.cuda.synchronize()

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

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on at most batch_size rows of the training set; returns (summed loss, grad norm)."""
        slots = np.full(self.batch_size, -1, dtype=np.int64)
        slots[: len(rows)] = rows
        # Pinned, so the copy is asynchronous; it is ordered after the previous replay on the stream.
        self._rows.copy_(torch.from_numpy(slots).pin_memory(), non_blocking=True)
        bucket = self.bucket_for(rows)
        self._graphs[bucket].replay()
        return self._outputs[bucket]

