"""Forward passes without training: evaluation (loss + metrics) and class probabilities.

Batches are sorted by length so they carry little padding, and metrics accumulate batch by batch:
only label ids are kept, never the logits of the whole split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from ftcli.data import collate, length_sorted_batches
from ftcli.metrics import MetricSuite


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_kernels(device: torch.device) -> AbstractContextManager:
    """On CUDA, PyTorch's own attention kernels rather than cuDNN's: cuDNN builds an execution plan
    for every new input shape, up to 0.4 s each on an H200, and evaluation and dynamic padding bring
    dozens of shapes (measured: a final evaluation of 408 pairs took 5.0 s instead of 0.1 s).
    PyTorch's kernels run a graphed training step as fast."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32. auto is bf16 where the
    hardware computes it natively; fp16 runs in fp32 on the CPU, so a GPU config still runs there."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "fp16" and device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def resolved_precision(precision: str, device: torch.device) -> str:
    """What a precision setting computes in on this device: bf16, fp16 or fp32."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype(precision, device), "fp32")


def native_bf16(device: torch.device) -> bool:
    """A GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX instructions. Other CPUs emulate
    bf16 more slowly than they compute fp32. On a Zen 4 CPU (2 cores, MiniLM, measured) bf16
    training steps were 1.75x as fast as fp32 and evaluation 2.8x."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def iterate_logits(
    model: PreTrainedModel,
    dataset: Dataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    precision: str = "auto",
) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
    """(row indices, fp32 logits, batch) per length-sorted batch, in inference mode."""
    rows = dataset.to_list()
    dtype = autocast_dtype(precision, device)
    model.eval()
    with torch.inference_mode(), attention_kernels(device):
        for indices in length_sorted_batches(dataset["length"], batch_size):
            batch = collate([rows[i] for i in indices], pad_token_id)
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(**inputs).logits
            yield indices, logits.float(), batch


def evaluate_dataset(
    model: PreTrainedModel,
    dataset: Dataset,
    metric_names: list[str],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    precision: str = "auto",
) -> dict[str, float]:
    """Mean cross-entropy loss and every configured metric over a labeled split."""
    suite = MetricSuite(metric_names, model.config.num_labels)
    return score_dataset(model, dataset, suite, batch_size, pad_token_id, device, precision)


def score_dataset(
    model: PreTrainedModel,
    dataset: Dataset,
    suite: MetricSuite,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    precision: str = "auto",
) -> dict[str, float]:
    """evaluate_dataset with a suite of the caller's, whose confusion matrix is then the split's."""
    batches = iterate_logits(model, dataset, batch_size, pad_token_id, device, precision)
    return score(((logits, batch["labels"]) for _, logits, batch in batches), suite)


def score(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], suite: MetricSuite) -> dict[str, float]:
    """Mean cross-entropy loss and every metric of `suite` over (fp32 logits, labels) batches,
    fed batch by batch: only predicted and true label ids are kept, never the logits of a split."""
    loss_sum, examples = 0.0, 0
    for logits, labels in batches:
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        examples += len(labels)
        suite.add_batch(logits.argmax(-1).cpu().numpy(), labels.cpu().numpy())
    return {"loss": loss_sum / max(examples, 1)} | suite.compute()


def predict_probabilities(
    model: PreTrainedModel,
    dataset: Dataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    precision: str = "auto",
) -> np.ndarray:
    """Softmax probabilities, one row per example, in the dataset's order."""
    probabilities = np.zeros((len(dataset), model.config.num_labels), dtype=np.float32)
    for indices, logits, _ in iterate_logits(model, dataset, batch_size, pad_token_id, device, precision):
        probabilities[indices] = torch.softmax(logits, dim=-1).cpu().numpy()
    return probabilities
