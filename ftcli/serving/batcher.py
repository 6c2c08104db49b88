"""Batching with no timer: inputs of concurrent requests are gathered into one forward pass
whenever the engine is free, as text-embeddings-inference's router does.

A request's texts are tokenized in a pool of worker threads (HF fast tokenizers release the GIL
while they encode a batch), and the worker queues the token rows itself, so the engine can start
on them before the event loop hears that tokenization is done. One engine thread takes whatever is
queued the moment its last forward pass ends, up to max_batch rows and max_batch_tokens padded
tokens (rows x the batch's padded length: what the forward pass computes and holds), sorts the
rows by length, pads them to one length bucket and runs them; meanwhile the pool tokenizes the
next requests and the event loop writes the last batch's answers. A lone request thus starts at
once, and under load batches grow by themselves to what queued during the last pass.
--max-wait-ms opts into a wait for bigger batches: the oldest input then waits up to that long for
max_batch rows to gather.

The queue is bounded: past max_queue rows, enqueue refuses at once (the app answers 503) rather
than growing memory. A request whose client went away has its futures cancelled; they are
skipped, never computed. stop() answers everything queued before it returns (drain on SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ftcli.data.batching import MODEL_COLUMNS, pad_rows, round_up
from ftcli.serving.engines import Engine
from ftcli.serving.graphs import GraphedEngine, most_rows, row_buckets
from ftcli.serving.metrics import ServingMetrics

log = logging.getLogger("ftcli.serve")

# One tokenized row: input_ids, attention_mask [, token_type_ids], the model's columns, which the
# batcher reads; the rest (token_classification's words: word_ids, spans) is the answer's.
Row = dict[str, Any]
PAD_MULTIPLE = 8  # tensor-core and SIMD friendly widths; on the CPU it also bounds the shapes seen
GPU_SMALLEST_BUCKET = 16
DEFAULT_MAX_BATCH_TOKENS = 16_384  # text-embeddings-inference's default


class QueueFull(Exception):
    """More inputs are waiting than max_queue allows (or the server is stopping)."""


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
    arrived: float
    longest: int  # tokens of its longest row


class Batcher:
    def __init__(
        self, engine: Engine, pad_token_id: int, max_length: int, max_batch: int, max_wait_ms: float,
        max_queue: int, metrics: ServingMetrics, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        tokenizer_threads: int = 1,
    ) -> None:
        self.engine, self.pad_token_id, self.max_length = engine, pad_token_id, max_length
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.max_batch_tokens, self.tokenizer_threads, self.metrics = max_batch_tokens, tokenizer_threads, metrics
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._changed = threading.Condition()  # guards the queue; notified on every enqueue and on stop
        self._stopping = False
        self._tokenizers = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="ftcli-tokenize")
        self._engine_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the engine thread; call from inside the server's event loop, which gets the answers."""
        self._loop = asyncio.get_running_loop()
        self._engine_thread = threading.Thread(target=self._serve, name="ftcli-engine", daemon=True)
        self._engine_thread.start()

    async def stop(self) -> None:
        """Answer what is queued, then stop (the server has stopped taking requests by now)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._engine_thread is not None:
            await asyncio.to_thread(self._engine_thread.join)
        self._tokenizers.shutdown(wait=True)

    async def submit(self, inputs: int, encode: Callable[[], list[list[Row]]]) -> list[np.ndarray]:
        """Each input's logits: `encode` (the inputs' token rows, one list per input) runs in the
        tokenizer pool, which queues its rows; what it raises (and QueueFull) reaches the caller."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(inputs)]
        try:
            await loop.run_in_executor(self._tokenizers, lambda: self.enqueue(encode(), futures))
            return await asyncio.gather(*futures)
        except asyncio.CancelledError:  # the client went away: the engine skips its inputs
            for future in futures:
                future.cancel()
            raise

    def enqueue(self, inputs: list[list[Row]], futures: list[asyncio.Future]) -> None:
        """Queue each input's rows, to answer its future; from any thread. QueueFull for all of a
        request's inputs when they do not fit."""
        rows = sum(len(input_rows) for input_rows in inputs)
        now = time.monotonic()
        with self._changed:
            if self._stopping or self._queued_rows + rows > self.max_queue:
                raise QueueFull()
            for input_rows, future in zip(inputs, futures, strict=True):
                self._queue.append(_Pending(input_rows, future, now, max(len(row["input_ids"]) for row in input_rows)))
            self._queued_rows += rows
            self.metrics.queue.set(self._queued_rows)
            self._changed.notify()

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

    def _serve(self) -> None:
        """The engine thread: batch after batch until stopped with nothing queued."""
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        """What is queued now (waiting for some first), or None once stopping with nothing queued."""
        with self._changed:
            while True:
                while not self._queue:
                    if self._stopping:
                        return None
                    self._changed.wait()
                self._wait_for_company()
                batch = self._take()
                if batch:
                    return batch

    def _wait_for_company(self) -> None:
        """With --max-wait-ms only: wait until max_batch rows are queued or the oldest has waited max_wait."""
        while self.max_wait > 0 and not self._stopping and self._queued_rows < self.max_batch:
            remaining = self._queue[0].arrived + self.max_wait - time.monotonic()
            if remaining <= 0:
                return
            self._changed.wait(remaining)

    def _take(self) -> list[_Pending]:
        """The oldest inputs within max_batch rows and max_batch_tokens padded tokens (at least one
        input, whatever its size), skipping those whose client went away."""
        batch: list[_Pending] = []
        rows = longest = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled: its client went away, nothing to compute
                self._queue.popleft()
                self._queued_rows -= len(pending.rows)
                continue
            grown_rows, grown_longest = rows + len(pending.rows), max(longest, pending.longest)
            padded = grown_rows * bucket_length(grown_longest, self.engine.device.type, self.max_length)
            if batch and (grown_rows > self.max_batch or padded > self.max_batch_tokens):
                break
            self._queue.popleft()
            self._queued_rows -= len(pending.rows)
            batch.append(pending)
            rows, longest = grown_rows, grown_longest
        self.metrics.queue.set(self._queued_rows)
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        """One forward pass; its answers are handed to the event loop, which sets the futures."""
        rows = [row for pending in batch for row in pending.rows]
        self.metrics.batch_size.observe(len(rows))
        try:
            logits = self.forward(rows)
        except Exception as error:  # every request of the batch fails alike; the server goes on
            log.exception("forward pass of %d inputs failed", len(rows))
            self._loop.call_soon_threadsafe(_fail, batch, error)
            return
        self._loop.call_soon_threadsafe(_answer, batch, logits)


def _answer(batch: list[_Pending], logits: np.ndarray) -> None:
    start = 0
    for pending in batch:
        if not pending.future.done():
            pending.future.set_result(logits[start : start + len(pending.rows)])
        start += len(pending.rows)


def _fail(batch: list[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


def warm_up(batcher: Batcher, sample: Row) -> None:
    """Run the shapes a server will see first, so the first requests pay no one-time costs
    (kernel selection, memory pools, onnxruntime's first-run setup, a graphed engine's capture)."""
    engine = batcher.engine
    shapes = warm_up_shapes(
        engine.device.type, len(sample["input_ids"]), batcher.max_length, batcher.max_batch, batcher.max_batch_tokens
    )
    with engine.capturing() if isinstance(engine, GraphedEngine) else nullcontext():
        for count, length in shapes:
            row = {name: (values * length)[:length] for name, values in sample.items() if name in MODEL_COLUMNS}
            batcher.forward([row] * count)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def warm_up_shapes(
    device_type: str, sample_length: int, max_length: int, max_batch: int, max_batch_tokens: int
) -> list[tuple[int, int]]:
    """The (rows, padded length) shapes of warm-up, most tokens first (so that one CUDA graph
    memory pool, sized by the largest, serves the rest): one row and the most rows that
    max_batch_tokens lets into a batch, at the sample's length and the longest; on a GPU at every
    length bucket and every row count a graphed engine pads to (graphs.row_buckets)."""
    lengths = {sample_length, max_length} | (set(range(1, max_length + 1)) if device_type == "cuda" else set())
    shapes = set()
    for length in {bucket_length(length, device_type, max_length) for length in lengths}:
        most = most_rows(length, max_batch, max_batch_tokens)
        shapes |= {(count, length) for count in (row_buckets(most) if device_type == "cuda" else {1, most})}
    return sorted(shapes, key=lambda shape: (-shape[0] * shape[1], -shape[1]))
