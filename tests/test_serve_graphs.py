"""The torch engine's CUDA graphs for ftcli serve: the row buckets a batch is padded to, that the
padding rows leave the real rows' answers alone (eager, on the CPU), the shapes warm-up visits,
and on a GPU that the graphed engine answers as the eager one and replays each shape's graph.

Needs only torch, transformers and ftcli (no datasets, pydantic or fastapi where the GPU tests run):
    python -m pytest tests/test_serve_graphs.py
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ftcli.runtime import Runtime
from ftcli.serving.engines import TorchEngine
from ftcli.serving.graphs import GraphedEngine, most_rows, pad_to_rows, row_bucket, row_buckets

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    shape = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(shape).eval()


def batch_of(lengths: list[int], padded: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows of random tokens of these lengths, padded with 0 to `padded` columns, as the batcher pads them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), padded), generator=generator)
    mask = (torch.arange(padded)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_row_counts_pad_up_to_a_power_of_two_within_max_batch_and_the_token_budget():
    assert [row_bucket(rows, 64) for rows in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert row_bucket(40, 48) == 48 and row_bucket(70, 64) == 70  # the most rows are a bucket; more keep their count
    assert most_rows(16, 64, 16_384) == 64 and most_rows(512, 64, 16_384) == 32 and most_rows(512, 64, 100) == 1
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(40) == [1, 2, 4, 8, 16, 32, 40]  # padding never takes a batch past the budget
    assert row_buckets(1) == [1]


def test_padding_repeats_the_last_real_row():
    batch = batch_of([3, 5, 2], 8)
    padded = pad_to_rows(batch, 8)
    for name, tensor in padded.items():
        assert tensor.shape == (8, 8)
        assert torch.equal(tensor[:3], batch[name]) and torch.equal(tensor[3:], batch[name][2:].expand(5, 8))
    assert pad_to_rows(batch, 3)["input_ids"] is batch["input_ids"]


def test_padding_rows_do_not_change_the_real_rows_answers():
    engine = TorchEngine(tiny_bert(), Runtime(torch.device("cpu"), None), "tiny", threads=1)
    batch = batch_of([3, 7, 16, 11, 5], 16)
    alone = engine.logits(batch)
    padded = engine.logits(pad_to_rows(batch, 8))
    assert padded.shape == (8, 3)
    np.testing.assert_allclose(padded[:5], alone, rtol=0, atol=1e-5)
    assert np.abs(alone).max() > 1e-2  # answers that could differ


def test_warm_up_visits_every_shape_a_batch_can_run_at_largest_first():
    batcher = pytest.importorskip("ftcli.serving.batcher")  # datasets and prometheus-client, not on every GPU machine
    shapes = batcher.warm_up_shapes("cuda", 9, 128, 64, 2_048)
    lengths = sorted({batcher.bucket_length(length, "cuda", 128) for length in range(1, 129)})
    assert lengths == [16, 32, 64, 128]
    for length in lengths:
        most = most_rows(length, 64, 2_048)
        assert {row_bucket(rows, most) for rows in range(1, most + 1)} == {count for count, at in shapes if at == length}
    assert (64, 32) in shapes and (16, 128) in shapes and (32, 128) not in shapes  # 2,048 tokens at most
    tokens = [count * length for count, length in shapes]
    assert tokens == sorted(tokens, reverse=True)
    # The CPU: one row and the most that fit, at the sample's length and the longest, as before.
    assert sorted(batcher.warm_up_shapes("cpu", 9, 128, 64, 2_048)) == [(1, 16), (1, 128), (16, 128), (64, 16)]


def graphed_pair(model: torch.nn.Module, dtype: torch.dtype | None) -> tuple[TorchEngine, GraphedEngine]:
    runtime = Runtime(torch.device("cuda"), dtype)
    eager = TorchEngine(model, runtime, "tiny", threads=1)
    return eager, GraphedEngine(eager, max_batch=8, max_batch_tokens=8 * 64)


@cuda
def test_the_graphed_engine_answers_as_the_eager_one_and_replays_each_shape():
    eager, graphed = graphed_pair(tiny_bert(), None)
    first, second = batch_of([3, 9, 16], 16, seed=2), batch_of([40, 64, 12, 33, 50], 64, seed=3)
    with graphed.capturing():
        graphed.logits(first), graphed.logits(second)
    assert graphed.cuda_graphs and graphed.shapes == [(4, 16), (8, 64)]
    third = batch_of([16, 1, 8], 16, seed=6)  # other rows of the first's shape
    expected = [eager.logits(first), eager.logits(second), eager.logits(third)]
    longer = {name: tensor[:3] for name, tensor in second.items()}  # (4, 64): no graph of that shape

    def no_eager(*args, **kwargs):
        raise AssertionError("ran eagerly")

    eager.forward = eager.logits = no_eager  # from here on an answer can only come from a replay
    for batch, answer in zip([first, second, third, first], [*expected, expected[0]]):
        np.testing.assert_allclose(graphed.logits(batch), answer, rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="ran eagerly"):  # shapes seen after warm-up are not captured
        graphed.logits(longer)


@cuda
def test_bf16_graphs_answer_as_the_eager_bf16_engine():
    eager, graphed = graphed_pair(tiny_bert(), torch.bfloat16)
    batch = batch_of([3, 9, 16, 2, 7], 16, seed=4)
    with graphed.capturing():
        graphed.logits(batch)
    assert graphed.cuda_graphs
    difference = np.abs(graphed.logits(batch) - eager.logits(batch)).max()
    assert difference <= 1e-2, difference  # same kernels but for the GEMMs' row count: bf16 rounding at most


class HostSync(torch.nn.Module):
    """A model whose forward reads a value back to the host, which no graph can capture."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, **inputs: torch.Tensor):
        if inputs["attention_mask"].sum().item() < 0:  # never true; the read is the point
            raise AssertionError
        return self.bert(**inputs)


@cuda
def test_a_forward_that_cannot_be_captured_runs_eagerly_after_one_log_line(caplog):
    eager, graphed = graphed_pair(HostSync().eval(), None)
    batch = batch_of([3, 9, 16], 16, seed=5)
    with caplog.at_level(logging.WARNING, logger="ftcli.serve"), graphed.capturing():
        answers = [graphed.logits(batch), graphed.logits(batch_of([30], 32))]
    assert not graphed.cuda_graphs and graphed.failure
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("CUDA graphs off, serving eagerly"), warnings
    np.testing.assert_allclose(answers[0], eager.logits(batch), rtol=0, atol=1e-6)
    np.testing.assert_allclose(graphed.logits(batch), answers[0], rtol=0, atol=1e-6)
