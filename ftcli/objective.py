"""The objective: the loss a model trains on, and what its logits mean.

The one home of the loss. The loop's eager step, its CUDA-graph step, the trainer backend and
evaluation all call it, so a change here changes every path alike. Losses are sums over the
examples of a batch: the callers divide by the examples of an optimizer step, which is how the
loop keeps gradient accumulation and several processes exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ftcli.config import TrainingConfig
from ftcli.data.prepare import Prepared
from ftcli.errors import FtcliError


class Objective:
    """Single-label classification: softmax cross-entropy, the training loss optionally weighted
    per class (training.class_weights); evaluation scores the plain loss, so runs with and without
    weights compare on it."""

    # A label the loss skips: the CUDA-graph step fills the empty slots of a short last batch with it.
    IGNORE = -100

    def __init__(self, class_weights: torch.Tensor | None = None) -> None:
        self.class_weights = class_weights

    def to(self, device: torch.device) -> Objective:
        """The same objective with its weights on `device` (moved once, not at every step)."""
        if self.class_weights is None:
            return self
        return Objective(self.class_weights.to(device))

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed training loss of a batch, weighted per class when asked."""
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="sum", ignore_index=self.IGNORE)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed evaluation loss of a batch: never weighted."""
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        """Predicted class ids, on the host."""
        return logits.argmax(-1).cpu().numpy()


def build_objective(training: TrainingConfig, prepared: Prepared) -> Objective:
    """The objective training.* asks for on this data."""
    return Objective(class_weights(training.class_weights, prepared))


def class_weights(setting: str | list[float] | None, prepared: Prepared) -> torch.Tensor | None:
    """The training loss's weight per class (label id order), from training.class_weights."""
    if setting is None:
        return None
    names = prepared.label_names
    if setting != "balanced":
        if len(setting) != len(names):
            raise FtcliError(
                f"training.class_weights has {len(setting)} weights for {len(names)} labels ({', '.join(names)})",
                "give one weight per label, in data.label_names order, or use balanced",
            )
        return torch.tensor(setting, dtype=torch.float32)
    counts = prepared.summary["train"].label_counts
    missing = [name for name in names if not counts[name]]
    if missing:
        raise FtcliError(
            f"training.class_weights: balanced is undefined: label '{missing[0]}' has no training examples",
            "give training.class_weights as one weight per label",
        )
    total = sum(counts.values())
    return torch.tensor([total / (len(names) * counts[name]) for name in names], dtype=torch.float32)


def clip_scale(grad_norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies every gradient by (the eager steps
    clip through it): max_grad_norm / (norm + 1e-6), never above 1. The CUDA-graph step applies it
    to its flat gradient buffer in one kernel."""
    return (max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
