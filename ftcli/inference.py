"""Forward passes without training: scoring a split (loss and metrics), and probabilities (what
they decide and read as: the run's task in ftcli.tasks).

Batches are sorted by length so they carry little padding, and metrics accumulate batch by batch:
only predictions and labels are kept, never the logits of a whole split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from ftcli.data.batching import DOCUMENT_COLUMNS, IGNORE_LABEL, collate, column, label_tensor, pad_rows
from ftcli.data.padding import length_sorted_batches
from ftcli.metrics import MetricSuite
from ftcli.runtime import Runtime
from ftcli.objective import Objective

if TYPE_CHECKING:
    # A split is a Dataset, or (ftcli predict, which imports no datasets: seconds) its rows as Columns.
    from datasets import Dataset

    from ftcli.data.prepare import Columns


def iterate_logits(
    model: PreTrainedModel, dataset: Dataset | Columns, batch_size: int, pad_token_id: int, runtime: Runtime
) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
    """(row indices, fp32 logits, batch) per length-sorted batch, in inference mode."""
    rows = dataset.to_list()
    model.eval()
    with torch.inference_mode(), runtime.attention_kernels():
        for indices in length_sorted_batches(column(dataset, "length"), batch_size):
            batch = collate([rows[i] for i in indices], pad_token_id)
            batch = {key: value.to(runtime.device, non_blocking=True) for key, value in batch.items()}
            inputs = {key: value for key, value in batch.items() if key != "labels" and key not in DOCUMENT_COLUMNS}
            with runtime.autocast():
                logits = model(**inputs).logits
            yield indices, logits.float(), batch


DOCUMENT_CHUNK = 1024  # documents scored at a time, once their windows are put together


def documents_of(dataset: Dataset | Columns) -> tuple[torch.Tensor, ...] | None:
    """A windowed split's document of each row (long_text: window), and how many documents, then
    (token_classification) each row token's place in its document, padded with -1 to the split's
    longest row as its logits are; else None. What objective.aggregate takes after the logits."""
    if "doc" not in dataset.column_names:
        return None
    documents = torch.tensor(column(dataset, "doc"))
    found = (documents, int(documents.max()) + 1 if len(documents) else 0)
    if "doc_positions" in dataset.column_names:
        found += (pad_rows(column(dataset, "doc_positions"), max(column(dataset, "length"), default=0), -1),)
    return found


def evaluate_dataset(
    model: PreTrainedModel,
    dataset: Dataset,
    metric_names: list[str],
    batch_size: int,
    pad_token_id: int,
    runtime: Runtime,
    objective: Objective,
) -> dict[str, float]:
    """Mean loss and every configured metric over a labeled split."""
    suite = MetricSuite(metric_names, [model.config.id2label[index] for index in range(model.config.num_labels)], objective.task)
    return score_dataset(model, dataset, suite, batch_size, pad_token_id, runtime, objective)


def score_dataset(
    model: PreTrainedModel,
    dataset: Dataset,
    suite: MetricSuite,
    batch_size: int,
    pad_token_id: int,
    runtime: Runtime,
    objective: Objective,
) -> dict[str, float]:
    """evaluate_dataset with a suite of the caller's, whose confusion matrix (or per-label table)
    is then the split's. A windowed split is scored per document, never per window."""
    if documents_of(dataset) is not None:
        return score_and_keep(model, dataset, suite, batch_size, pad_token_id, runtime, objective)[0]
    batches = iterate_logits(model, dataset, batch_size, pad_token_id, runtime)
    return score(((logits, batch["labels"]) for _, logits, batch in batches), suite, objective)


def score(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], suite: MetricSuite, objective: Objective) -> dict[str, float]:
    """Mean loss and every metric of `suite` over (fp32 logits, labels) batches, fed batch by
    batch: only predictions and labels are kept, never the logits of a split."""
    loss_sum, examples = 0.0, 0
    for logits, labels in batches:
        loss_sum += float(objective.loss_sum(logits, labels))
        examples += len(labels)
        scores = objective.scores(logits).cpu().numpy() if suite.needs_scores else None
        suite.add_batch(objective.predictions(logits), labels.cpu().numpy(), scores)
    return {"loss": loss_sum / max(examples, 1)} | suite.compute()


def document_logits(
    model: PreTrainedModel, dataset: Dataset | Columns, batch_size: int, pad_token_id: int, runtime: Runtime, objective: Objective
) -> torch.Tensor:
    """Every example's fp32 logits, in the dataset's order, on the host (a split's worth); a
    windowed split's per document, its windows put together by the objective."""
    logits, documents = row_logits(model, dataset, batch_size, pad_token_id, runtime), documents_of(dataset)
    return logits if documents is None else objective.aggregate(logits, *documents)


def row_logits(
    model: PreTrainedModel, dataset: Dataset | Columns, batch_size: int, pad_token_id: int, runtime: Runtime
) -> torch.Tensor:
    """Every row's fp32 logits (a window's, for windows), in the dataset's order, on the host."""
    logits = logits_store(model, dataset)
    for indices, batch_logits, _ in iterate_logits(model, dataset, batch_size, pad_token_id, runtime):
        keep(logits, indices, batch_logits)
    return logits


def logits_store(model: PreTrainedModel, dataset: Dataset | Columns) -> torch.Tensor:
    """Zeros for a split's logits: a row per example, or (a tag per token) a row per token of
    each, as many as the longest example's."""
    if "word_ids" in dataset.column_names:  # tokenized as words: token_classification
        return torch.zeros(len(dataset), max(column(dataset, "length"), default=0), model.config.num_labels)
    return torch.zeros(len(dataset), model.config.num_labels)


def keep(logits: torch.Tensor, indices: np.ndarray, batch_logits: torch.Tensor) -> None:
    """A batch's logits into the split's, at its rows (and its tokens)."""
    rows = torch.from_numpy(np.asarray(indices))
    if batch_logits.dim() == 3:
        logits[rows, : batch_logits.shape[1]] = batch_logits.cpu()
    else:
        logits[rows] = batch_logits.cpu()


def document_labels(dataset: Dataset, objective: Objective) -> torch.Tensor:
    """Every example's label (a windowed split's per document), in the dataset's order."""
    labels = label_tensor(column(dataset, "labels"), max(column(dataset, "length"), default=0))
    documents = documents_of(dataset)
    return labels if documents is None else objective.aggregate_labels(labels, *documents)


def score_and_keep(
    model: PreTrainedModel,
    dataset: Dataset,
    suite: MetricSuite,
    batch_size: int,
    pad_token_id: int,
    runtime: Runtime,
    objective: Objective,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """score_dataset that also keeps every example's logits (in the dataset's order), for an
    analysis of the errors: one pass, the same numbers. A windowed split is scored per document."""
    if documents_of(dataset) is not None:
        logits = document_logits(model, dataset, batch_size, pad_token_id, runtime, objective)
        labels = document_labels(dataset, objective)
        chunks = ((logits[start : start + DOCUMENT_CHUNK], labels[start : start + DOCUMENT_CHUNK]) for start in range(0, len(logits), DOCUMENT_CHUNK))
        return score(chunks, suite, objective), logits, labels
    logits = logits_store(model, dataset)

    def batches():
        for indices, batch_logits, batch in iterate_logits(model, dataset, batch_size, pad_token_id, runtime):
            keep(logits, indices, batch_logits)
            yield batch_logits, batch["labels"]

    return score(batches(), suite, objective), logits, document_labels(dataset, objective)


def by_document(batches: Iterable[tuple], objective: Objective) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) batches as they come; batches of windows, (logits, labels, documents),
    all gathered first and put together per document (a document's windows may sit in any batch)."""
    windows: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        if len(batch) == 2:
            yield batch
        else:
            windows.append(tuple(part.cpu() for part in batch))
    if windows:
        logits, labels, documents, *positions = (_joined(parts) for parts in zip(*windows))
        count = int(documents.max()) + 1
        merged = objective.aggregate(logits, documents, count, *positions)
        merged_labels = objective.aggregate_labels(labels, documents, count, *positions)
        for start in range(0, count, DOCUMENT_CHUNK):
            yield merged[start : start + DOCUMENT_CHUNK], merged_labels[start : start + DOCUMENT_CHUNK]


def _joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Batches' tensors as one; per-token ones (a tagger's windows), each as wide as its batch,
    padded to the widest with IGNORE_LABEL, which no place, tag or read logit is."""
    width = max(part.shape[1] for part in parts) if parts[0].dim() > 1 else 0
    return torch.cat([
        torch.nn.functional.pad(part, (0, 0) * (part.dim() - 2) + (0, width - part.shape[1]), value=IGNORE_LABEL)
        if part.dim() > 1 and part.shape[1] < width else part
        for part in parts
    ])


def predict_scores(
    model: PreTrainedModel,
    dataset: Dataset | Columns,
    batch_size: int,
    pad_token_id: int,
    runtime: Runtime,
    objective: Objective,
) -> np.ndarray:
    """The objective's scores (probabilities, or values for regression), one row per example (per
    document of a windowed split), in the dataset's order."""
    logits = document_logits(model, dataset, batch_size, pad_token_id, runtime, objective)
    return objective.scores(logits).numpy()
