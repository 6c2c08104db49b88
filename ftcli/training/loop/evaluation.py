"""The loop's evaluation during training: each process scores its share of the validation split."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader

from ftcli.data.batching import DOCUMENT_COLUMNS, IGNORE_LABEL, collate, column
from ftcli.data.padding import length_sorted_batches
from ftcli.inference import by_document, score
from ftcli.metrics import MetricSuite
from ftcli.runtime import attention_kernels
from ftcli.objective import Objective


def private_generator() -> torch.Generator:
    """A DataLoader draws a seed from this generator each time it starts iterating, and without
    one from torch's global generator, which dropout uses: a resumed run, starting its loader at
    another moment, would then continue with other dropout masks."""
    return torch.Generator().manual_seed(0)


def evaluation_loader(dataset: Dataset, batch_size: int, pad_token_id: int) -> DataLoader:
    """Batches of similar lengths (little padding), longest first, as ftcli.inference evaluates."""
    order = np.concatenate(length_sorted_batches(column(dataset, "length"), batch_size))
    return DataLoader(
        dataset.select(order),
        batch_size=batch_size,
        collate_fn=partial(collate, pad_token_id=pad_token_id),
        generator=private_generator(),
    )


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    suite: MetricSuite,
    objective: Objective,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss and every metric over the validation split, each process scoring its share.

    autocast: a precision to apply here, when Accelerate does not (the CUDA-graph path)."""

    def gathered_batches():
        for batch in loader:
            labels = batch.pop("labels")
            documents = tuple(batch.pop(column) for column in DOCUMENT_COLUMNS if column in batch)  # windows
            with torch.autocast(accelerator.device.type, dtype=autocast, enabled=autocast is not None):
                logits = model(**batch).logits.float()
            # With several processes the last batch is topped up with repeated examples so that
            # every process has one; gather_for_metrics drops them, so each example counts once.
            yield accelerator.gather_for_metrics(widest_across_processes(accelerator, logits, labels, *documents))

    model.eval()
    with torch.no_grad(), attention_kernels(accelerator.device):  # evaluation brings many shapes
        metrics = score(by_document(gathered_batches(), objective), suite, objective)
    model.train()
    return metrics


def widest_across_processes(
    accelerator: Accelerator, logits: torch.Tensor, labels: torch.Tensor, *documents: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """A tagger's per-token tensors (logits (rows, tokens, tags), labels and a window's places
    (rows, tokens)) padded to the widest batch of any process: each process pads its batch to its
    own longest sentence, and gather_for_metrics joins rows of equal width only. The padding reads
    as no token: logits 0, labels IGNORE_LABEL, places -1 (reported by no window)."""
    if logits.dim() < 3 or accelerator.num_processes == 1:  # one row per text, or nothing to agree with
        return (logits, labels, *documents)
    widest = partial(accelerator.pad_across_processes, dim=1)
    places = (widest(part, pad_index=-1) if part.dim() > 1 else part for part in documents)
    return (widest(logits, pad_index=0), widest(labels, pad_index=IGNORE_LABEL), *places)
