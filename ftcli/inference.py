"""Forward passes without training: scoring a split (loss and metrics) and probabilities.

Batches are sorted by length so they carry little padding, and metrics accumulate batch by batch:
only predictions and labels are kept, never the logits of a whole split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel

from ftcli.data.batching import collate, length_sorted_batches
from ftcli.metrics import MetricSuite
from ftcli.runtime import Runtime
from ftcli.objective import Objective


def iterate_logits(
    model: PreTrainedModel, dataset: Dataset, batch_size: int, pad_token_id: int, runtime: Runtime
) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
    """(row indices, fp32 logits, batch) per length-sorted batch, in inference mode."""
    rows = dataset.to_list()
    model.eval()
    with torch.inference_mode(), runtime.attention_kernels():
        for indices in length_sorted_batches(dataset["length"], batch_size):
            batch = collate([rows[i] for i in indices], pad_token_id)
            batch = {key: value.to(runtime.device, non_blocking=True) for key, value in batch.items()}
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            with runtime.autocast():
                logits = model(**inputs).logits
            yield indices, logits.float(), batch


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
    suite = MetricSuite(metric_names, model.config.num_labels, objective.task)
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
    is then the split's."""
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


def all_logits(
    model: PreTrainedModel, dataset: Dataset, batch_size: int, pad_token_id: int, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example's fp32 logits and label, in the dataset's order, on the host (a split's worth)."""
    logits = torch.zeros(len(dataset), model.config.num_labels)
    for indices, batch_logits, _ in iterate_logits(model, dataset, batch_size, pad_token_id, runtime):
        logits[torch.from_numpy(np.asarray(indices))] = batch_logits.cpu()
    return logits, _labels(dataset)


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
    analysis of the errors: one pass, the same numbers."""
    logits = torch.zeros(len(dataset), model.config.num_labels)

    def batches():
        for indices, batch_logits, batch in iterate_logits(model, dataset, batch_size, pad_token_id, runtime):
            logits[torch.from_numpy(np.asarray(indices))] = batch_logits.cpu()
            yield batch_logits, batch["labels"]

    return score(batches(), suite, objective), logits, _labels(dataset)


def _labels(dataset: Dataset) -> torch.Tensor:
    labels = torch.tensor(dataset["labels"])
    return labels.float() if labels.is_floating_point() else labels.long()


def predict_scores(
    model: PreTrainedModel,
    dataset: Dataset,
    batch_size: int,
    pad_token_id: int,
    runtime: Runtime,
    objective: Objective,
) -> np.ndarray:
    """The objective's scores (probabilities, or values for regression), one row per example, in
    the dataset's order."""
    rows: np.ndarray | None = None
    for indices, logits, _ in iterate_logits(model, dataset, batch_size, pad_token_id, runtime):
        scores = objective.scores(logits).cpu().numpy()
        if rows is None:
            rows = np.zeros((len(dataset), *scores.shape[1:]), dtype=np.float32)
        rows[indices] = scores
    return rows
