"""Dynamic micro-batching: inputs of concurrent requests are gathered into one forward pass.

An input waits at most max_wait_ms after it arrived (inputs that queued while the last batch ran
go at once) or until max_batch rows are waiting; the rows are sorted by length, padded to one
length bucket and run once in the engine's own thread, while the event loop goes on reading
requests. Each input's future is then answered with its own rows' logits. The queue is bounded:
past max_queue rows, enqueue refuses at once (the app answers 503) rather than growing memory.
A request whose client went away has its futures cancelled; they are skipped, never waited on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ftcli.data.batching import MODEL_COLUMNS, pad_rows, round_up
from ftcli.serving.engines import Engine
from ftcli.serving.metrics import ServingMetrics

log = logging.getLogger("ftcli.serve")

# One tokenized row: input_ids, attention_mask [, token_type_ids], the model's columns, which the
# batcher reads; the rest (token_classification's words: word_ids, spans) is the answer's.
Row = dict[str, Any]
PAD_MULTIPLE = 8  # tensor-core and SIMD friendly widths; on the CPU it also bounds the shapes seen
GPU_SMALLEST_BUCKET = 16


class QueueFull(Exception):
    """More inputs are waiting than max_queue allows."""


def bucket_length(longest: int, device_type: str, max_length: int) -> int:
    """The padded length of a batch whose longest row has `longest` tokens: a multiple of 8 on the
    CPU; on a GPU a power of two (at most the model's max_length rounded to 8), so that a server
    sees a handful of shapes and its kernels' plans are made once, at warm-up."""
    if device_type != "cuda":
        return round_up(longest, PAD_MULTIPLE)
    power = max(GPU_SMALLEST_BUCKET, 1 << (max(longest, 1) - 1).bit_length())
    return max(min(power, round_up(max_length, PAD_MULTIPLE)), round_up(longest, PAD_MULTIPLE))


@dataclass
class _Pending:
    rows: list[Row]
    future: asyncio.Future
    arrived: float = field(default=0.0)


class Batcher:
    def __init__(
        self, engine: Engine, pad_token_id: int, max_length: int, max_batch: int, max_wait_ms: float,
        max_queue: int, metrics: ServingMetrics,
    ) -> None:
        self.engine, self.pad_token_id, self.max_length = engine, pad_token_id, max_length
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        # One thread: forward passes run one after another, each with all of the engine's threads.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ftcli-engine")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start gathering; call from inside the server's event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ftcli-batcher")

    async def stop(self) -> None:
        """Answer what is queued, then stop (the server has stopped taking requests by now)."""
        while self._queue:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def enqueue(self, inputs: list[list[Row]]) -> list[asyncio.Future]:
        """One future per input (its rows' logits), or QueueFull for all of a request's inputs."""
        rows = sum(len(input_rows) for input_rows in inputs)
        if self._queued_rows + rows > self.max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        futures = []
        for input_rows in inputs:
            pending = _Pending(input_rows, loop.create_future(), loop.time())
            self._queue.append(pending)
            futures.append(pending.future)
        self._queued_rows += rows
        self.metrics.queue.set(self._queued_rows)
        self._wakeup.set()
        return futures

    def forward(self, rows: list[Row]) -> np.ndarray:
        """The logits of rows in their order: run sorted by length, padded to one bucket."""
        order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
        ordered = [rows[index] for index in order]
        length = bucket_length(len(ordered[-1]["input_ids"]), self.engine.device.type, self.max_length)
        batch = {
            name: pad_rows([row[name] for row in ordered], length, self.pad_token_id if name == "input_ids" else 0)
            for name in MODEL_COLUMNS
            if name in ordered[0]
        }
        computed = self.engine.logits(batch)
        logits = np.empty_like(computed)
        logits[order] = computed
        return logits

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._gather(loop)
            batch = self._take()
            if batch:
                await self._answer(loop, batch)
            if self._queue:
                self._wakeup.set()

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for more inputs until the oldest has waited max_wait or max_batch rows are there."""
        while self._queue and self._queued_rows < self.max_batch:
            remaining = self._queue[0].arrived + self.max_wait - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            self._wakeup.clear()

    def _take(self) -> list[_Pending]:
        """The oldest inputs up to max_batch rows (at least one input), skipping cancelled ones."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # its client went away: nothing to compute
                self._queue.popleft()
                self._queued_rows -= len(pending.rows)
                continue
            if batch and rows + len(pending.rows) > self.max_batch:
                break
            self._queue.popleft()
            self._queued_rows -= len(pending.rows)
            batch.append(pending)
            rows += len(pending.rows)
        self.metrics.queue.set(self._queued_rows)
        return batch

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        self.metrics.batch_size.observe(len(rows))
        try:
            logits = await loop.run_in_executor(self._executor, self.forward, rows)
        except Exception as error:  # every request of the batch fails alike; the server goes on
            log.exception("forward pass of %d inputs failed", len(rows))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        start = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(logits[start : start + len(pending.rows)])
            start += len(pending.rows)


def warm_up(batcher: Batcher, sample: Row) -> None:
    """Run the shapes a server will see first, so the first requests pay no one-time costs
    (kernel selection, memory pools, onnxruntime's first-run setup): one row and max_batch rows,
    at the shortest and the longest length; on a GPU at every length bucket."""
    lengths = {len(sample["input_ids"]), batcher.max_length}
    if batcher.engine.device.type == "cuda":
        lengths |= {bucket_length(length, "cuda", batcher.max_length) for length in range(1, batcher.max_length + 1)}
    for length in sorted(lengths):
        row = {name: (values * length)[:length] for name, values in sample.items() if name in MODEL_COLUMNS}
        for count in (1, batcher.max_batch):
            batcher.forward([row] * count)
    if batcher.engine.device.type == "cuda":
        torch.cuda.synchronize()
