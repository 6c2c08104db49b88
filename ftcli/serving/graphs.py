"""The torch engine's forward pass replayed as CUDA graphs, one per (row count, length) bucket.

At one input per request a small model's forward pass is launch-bound: MiniLM's six layers are a
few hundred small kernels, which the host takes longer to issue than the GPU takes to run (on an
H100, ftcli served one MRPC pair per request at p50 5.5 ms against a plain pipeline server's
4.5 ms). A replayed graph issues them all at once.

A batch's length is already one of a few power-of-two buckets on a GPU (batcher.bucket_length);
its row count is padded up here to a power of two (1, 2, 4, ... up to the most rows of that length
within max_batch and max_batch_tokens, which is a bucket too) by repeating its last row, rows being
independent of each other, and only the real rows' logits are copied out.
Warm-up (batcher.warm_up) visits every (rows, length) bucket within max_batch_tokens, largest first,
inside `capturing()`, which captures each into one shared memory pool and logs how many it took,
how long and how much memory. The graph runs the torch engine's own forward (its autocast and
attention kernels), so it computes what the eager engine computes. A forward pass that cannot be
captured (one that reads a value back to the host, say) turns graphs off with one log line: the
server then runs every batch eagerly, as without graphs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ftcli.runtime import end_failed_capture, first_cause
from ftcli.serving.engines import Engine, TorchEngine

log = logging.getLogger("ftcli.serve")


def most_rows(length: int, max_batch: int, max_batch_tokens: int) -> int:
    """The most rows of a padded length that the batcher puts in one batch (more only where one
    input alone has more: a long text's windows)."""
    return max(1, min(max_batch, max_batch_tokens // length))


def row_bucket(rows: int, most: int) -> int:
    """The row count a batch of `rows` runs at: the next power of two, at most `most` (most_rows),
    so that padding never takes a batch past max_batch or max_batch_tokens. A batch of more rows
    than `most` keeps its count (and runs eagerly)."""
    if rows >= most:
        return rows
    return min(1 << (max(rows, 1) - 1).bit_length(), most)


def row_buckets(most: int) -> list[int]:
    """Every row count that batches of 1 to `most` rows run at: 1, 2, 4, ... and `most`."""
    return sorted({row_bucket(rows, most) for rows in range(1, most + 1)})


def pad_to_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The batch with its last row repeated up to `rows` rows: a real row, so the padding computes
    nothing unusual (a row of padding alone would attend to nothing), and every row is computed on
    its own, so the real rows' answers do not change."""
    def padded(tensor: torch.Tensor) -> torch.Tensor:
        extra = rows - len(tensor)
        return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])]) if extra > 0 else tensor

    return {name: padded(tensor) for name, tensor in batch.items()}


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static: each batch is copied into them before a replay
    logits: torch.Tensor  # static: overwritten by every replay


class GraphedEngine:
    """A TorchEngine on a GPU whose forward passes replay CUDA graphs; batches it has no graph for
    (more rows than most_rows lets in, a shape warm-up did not visit, or any after a failed
    capture) run on the eager engine."""

    name = "torch"

    def __init__(self, eager: TorchEngine, max_batch: int, max_batch_tokens: int) -> None:
        self.eager, self.max_batch, self.max_batch_tokens = eager, max_batch, max_batch_tokens
        self.device, self.file = eager.device, eager.file
        self.failure: str | None = None  # why graphs are off, once a capture failed
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._pool: tuple[int, int] | None = None
        self._capturing = False
        self._side = torch.cuda.Stream(self.device)

    @property
    def cuda_graphs(self) -> bool:
        return bool(self._graphs)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (rows, length) shapes it has graphs for."""
        return sorted(self._graphs)

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        rows, length = batch["input_ids"].shape
        most = most_rows(length, self.max_batch, self.max_batch_tokens)
        key = (row_bucket(rows, most), length)
        captured = self._graphs.get(key)
        if captured is None and (not self._capturing or rows > most):
            return self.eager.logits(batch)
        padded = pad_to_rows(batch, key[0])
        if captured is None:
            captured = self._capture(padded)
            if captured is None:
                return self.eager.logits(batch)
            self._graphs[key] = captured
        for name, tensor in padded.items():
            captured.inputs[name].copy_(tensor, non_blocking=True)
        captured.graph.replay()
        # Read at once: graphs captured later in the shared pool may reuse this memory for their own work.
        return captured.logits[:rows].cpu().numpy()

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """While open, each new shape's batch is captured (then replayed); on leaving, one log line."""
        started, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        self._capturing = self.failure is None
        try:
            yield
        finally:
            self._capturing = False
        if self._graphs:
            torch.cuda.synchronize(self.device)
            rows, lengths = sorted({rows for rows, _ in self._graphs}), sorted({length for _, length in self._graphs})
            grown = (torch.cuda.memory_reserved(self.device) - reserved) / 2**20
            log.info(
                "CUDA graphs: %d captured (rows %d-%d x lengths %d-%d) in %.1f s, %.0f MiB more GPU memory reserved",
                len(self._graphs), rows[0], rows[-1], lengths[0], lengths[-1], time.perf_counter() - started, grown,
            )

    def _capture(self, batch: dict[str, torch.Tensor]) -> _Captured | None:
        """One shape's graph, in the shared pool, after one eager pass on a side stream (lazy state:
        library handles, kernel choices); None, and graphs off for good, if capturing fails."""
        inputs = {name: tensor.to(self.device) for name, tensor in batch.items()}
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self.eager.forward(inputs, cache=False)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self.eager.forward(inputs, cache=False)
        except Exception as error:  # the eager pass above ran: only capturing it failed
            self._give_up(first_cause(error), batch["input_ids"].shape)
            return None
        self._pool = graph.pool()
        return _Captured(graph, inputs, logits)

    def _give_up(self, reason: str, shape: torch.Size) -> None:
        end_failed_capture(self.device)
        self.failure, self._capturing = reason, False
        self._graphs.clear()  # all eager from now on, so every batch computes alike
        log.warning("CUDA graphs off, serving eagerly: capturing the forward pass of %d x %d failed (%s)", *shape, reason)


def with_cuda_graphs(engine: Engine, max_batch: int, max_batch_tokens: int) -> Engine:
    """The engine, its forward passes replayed as CUDA graphs where it is the torch engine on a GPU."""
    if isinstance(engine, TorchEngine) and engine.device.type == "cuda":
        return GraphedEngine(engine, max_batch, max_batch_tokens)
    return engine
