"""Helpers the tasks' objectives share. Only an objective's methods import this module (and so
torch): importing a task stays torch-free, for the ONNX path."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ftcli.errors import FtcliError


def on_host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.cpu().numpy()


def mean_by(values: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
    """Each document's mean of its windows' rows."""
    totals = torch.zeros((count, *values.shape[1:]), dtype=values.dtype).index_add_(0, documents, values)
    windows = torch.zeros(count, dtype=values.dtype).index_add_(0, documents, torch.ones(len(documents), dtype=values.dtype))
    return totals / windows.clamp(min=1).reshape(-1, *([1] * (values.dim() - 1)))


def sum_of_real(per_example: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return (per_example * real).sum() if real is not None else per_example.sum()


def softmax_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)) along the last axis, in float32 (each
    row's distillation loss, Hinton et al. 2015): T^2 keeps its gradient, T * (softmax(logits / T) -
    softmax(teacher / T)), at the task loss's scale whatever T is."""
    log_student = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    # log_target: a teacher probability that underflows to 0 adds 0, never 0 * log 0.
    return temperature**2 * F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1)


def one_per_label(weights: list[float], names: list[str]) -> list[float]:
    if len(weights) != len(names):
        raise FtcliError(
            f"training.class_weights has {len(weights)} weights for {len(names)} labels ({', '.join(names)})",
            "give one weight per label, in data.label_names order, or use balanced",
        )
    return weights
