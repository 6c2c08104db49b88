"""The serving batcher on its own, with a fake engine held at a gate: batches form the moment the
engine is free (no timer) and take what queued meanwhile, within max_batch rows and
max_batch_tokens padded tokens; a full queue refuses; a gone client's input is skipped; stop()
answers everything queued first. Behaviour, not timing: every wait is for an event."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from ftcli.serving.batcher import Batcher, QueueFull
from ftcli.serving.metrics import ServingMetrics

PAD = 0


class GatedEngine:
    """Records each batch's (rows, padded length) and holds each forward pass until the gate opens;
    a row's logits are its first token id, so every answer can be traced to its input."""

    name, file, device = "fake", "fake", torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        self.batches.append(tuple(batch["input_ids"].shape))
        self.entered.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return batch["input_ids"][:, :1].float().numpy().repeat(2, axis=1)


def row(tokens: int, first: int) -> dict[str, list[int]]:
    return {"input_ids": [first] + [7] * (tokens - 1), "attention_mask": [1] * tokens}


def batcher_of(engine: GatedEngine, **settings) -> Batcher:
    options = {"max_batch": 64, "max_wait_ms": 0, "max_queue": 64, "max_batch_tokens": 16_384} | settings
    return Batcher(
        engine, PAD, 128, options["max_batch"], options["max_wait_ms"], options["max_queue"], ServingMetrics(options["max_batch"]),
        options["max_batch_tokens"], tokenizer_threads=2,
    )


async def entered(engine: GatedEngine) -> None:
    assert await asyncio.to_thread(engine.entered.acquire, timeout=30), "the engine never started a batch"


async def queued(batcher: Batcher, rows: int) -> None:
    """Until `rows` rows wait in the queue (tokenizer threads queue them)."""
    while batcher.metrics.registry.get_sample_value("ftcli_queue_inputs") != rows:
        await asyncio.sleep(0.005)


def submit(batcher: Batcher, tokens: int, first: int) -> asyncio.Task:
    return asyncio.ensure_future(batcher.submit(1, lambda: [[row(tokens, first)]]))


async def one_busy_then(batcher: Batcher, engine: GatedEngine, lengths: list[int]) -> list[np.ndarray]:
    """A lone input occupies the engine; `lengths` queue meanwhile; then the gate opens. The answers, in order."""
    batcher.start()
    first = submit(batcher, 5, 100)
    await entered(engine)
    rest = [submit(batcher, tokens, 101 + index) for index, tokens in enumerate(lengths)]
    await queued(batcher, len(lengths))
    engine.gate.set()
    answers = await asyncio.gather(first, *rest)
    await batcher.stop()
    return [answer[0] for answer in answers]


def test_a_lone_input_starts_at_once_and_the_next_batch_takes_everything_queued_meanwhile():
    engine = GatedEngine()
    batcher = batcher_of(engine, max_wait_ms=0)
    answers = asyncio.run(one_busy_then(batcher, engine, [5, 6, 9, 3, 5]))
    assert engine.batches == [(1, 8), (5, 16)]
    assert [int(answer[0, 0]) for answer in answers] == [100, 101, 102, 103, 104, 105]  # each its own row back


def test_max_batch_and_the_token_budget_split_what_queued():
    engine = GatedEngine()
    asyncio.run(one_busy_then(batcher_of(engine, max_batch=2), engine, [5] * 5))
    assert engine.batches == [(1, 8), (2, 8), (2, 8), (1, 8)]

    # Padded tokens count: three rows of 8 fit 64; a fourth of 30 tokens would pad all four to 32 (128).
    engine = GatedEngine()
    answers = asyncio.run(one_busy_then(batcher_of(engine, max_batch_tokens=64), engine, [8, 8, 8, 30, 16, 16]))
    assert engine.batches == [(1, 8), (3, 8), (2, 32), (1, 16)]
    assert [int(answer[0, 0]) for answer in answers] == list(range(100, 107))

    # An input over the budget on its own still goes, alone.
    engine = GatedEngine()
    asyncio.run(one_busy_then(batcher_of(engine, max_batch_tokens=16), engine, [30, 5]))
    assert engine.batches == [(1, 8), (1, 32), (1, 8)]


def test_max_wait_opts_into_waiting_for_a_full_batch():
    async def scenario() -> None:
        engine = GatedEngine()
        engine.gate.set()
        batcher = batcher_of(engine, max_batch=3, max_wait_ms=60_000)
        batcher.start()
        early = [submit(batcher, 5, 100), submit(batcher, 5, 101)]
        await queued(batcher, 2)
        assert not engine.batches  # two of three: still waiting for company
        await asyncio.gather(*early, submit(batcher, 5, 102))  # the third fills the batch: no minute's wait
        assert engine.batches == [(3, 8)]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_full_queue_refuses_a_request_whole():
    async def scenario() -> None:
        engine = GatedEngine()
        batcher = batcher_of(engine, max_batch=4, max_queue=4)
        batcher.start()
        busy = submit(batcher, 5, 100)
        await entered(engine)
        waiting = [submit(batcher, 5, 101 + index) for index in range(3)]
        await queued(batcher, 3)
        with pytest.raises(QueueFull):  # two more rows than fit: none of them is queued
            await batcher.submit(2, lambda: [[row(5, 1)], [row(5, 2)]])
        assert batcher.metrics.registry.get_sample_value("ftcli_queue_inputs") == 3
        engine.gate.set()
        await asyncio.gather(busy, *waiting)
        assert engine.batches == [(1, 8), (3, 8)]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_gone_clients_input_is_skipped():
    async def scenario() -> None:
        engine = GatedEngine()
        batcher = batcher_of(engine)
        batcher.start()
        busy = submit(batcher, 5, 100)
        await entered(engine)
        gone, kept = submit(batcher, 5, 101), submit(batcher, 5, 102)
        await queued(batcher, 2)
        gone.cancel()
        engine.gate.set()
        assert int((await kept)[0][0, 0]) == 102 and int((await busy)[0][0, 0]) == 100
        assert engine.batches == [(1, 8), (1, 8)]
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_answers_everything_queued_then_refuses():
    async def scenario() -> None:
        engine = GatedEngine()
        batcher = batcher_of(engine, max_batch=2)
        batcher.start()
        flights = [submit(batcher, 5, 100)]
        await entered(engine)
        flights += [submit(batcher, 5, 101 + index) for index in range(3)]
        await queued(batcher, 3)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the engine is still busy with what was queued
        engine.gate.set()
        await stopping
        assert [int(answer[0][0, 0]) for answer in await asyncio.gather(*flights)] == [100, 101, 102, 103]
        assert engine.batches == [(1, 8), (2, 8), (1, 8)]
        with pytest.raises(QueueFull):
            batcher.enqueue([[row(5, 1)]], [asyncio.get_running_loop().create_future()])

    asyncio.run(scenario())
