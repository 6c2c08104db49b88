"""What a model's outputs decide, in numpy: the one home of each task's decision rule and of what
one prediction reads as (the fields of `ftcli predict` and of the server).

    scores     single_label: softmax; multi_label: a sigmoid per label; regression: the value,
               clipped to data.label_range with data.clip_predictions
    decide     single_label: the most probable class, or with a decision threshold the second
               class when its probability reaches it; multi_label: each label whose probability
               reaches its threshold; regression: the value itself

The torch objectives (objective.py) compute their scores on the device and decide through these
functions, so training, evaluation and both prediction engines (torch, and the ONNX export
without torch) decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ftcli.tasks import MULTI_LABEL, REGRESSION


def softmax(logits: np.ndarray) -> np.ndarray:
    """single_label's class probabilities, along the last axis."""
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """multi_label's probability of each label."""
    return np.exp(-np.logaddexp(0, -logits))  # 1 / (1 + e^-x), without overflowing for large |x|


def regression_values(logits: np.ndarray, clip: tuple[float, float] | None = None) -> np.ndarray:
    """regression's predictions: the one output, within `clip` when given."""
    values = logits.squeeze(-1)
    return np.clip(values, *clip) if clip else values


def decide_single_label(scores: np.ndarray, decision_threshold: float | None = None) -> np.ndarray:
    """Class ids: the highest score's (the first on ties), or with a threshold (two classes) the
    second class where its probability reaches the threshold."""
    if decision_threshold is None:
        return scores.argmax(-1)
    # In the scores' precision, as torch compares a tensor with a Python number.
    return (scores[:, 1] >= np.asarray(decision_threshold, dtype=scores.dtype)).astype(np.int64)


def decide_multi_label(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """One 0/1 row per example: the labels whose probability reaches their threshold."""
    return (scores >= thresholds).astype(np.int8)


@dataclass(frozen=True)
class Decider:
    """A task's scores and decisions on numpy arrays: what its torch objective computes, for a
    model that runs without torch (an ONNX export)."""

    task: str
    decision_threshold: float | None = None  # single_label: the second class's; None: the most probable class
    thresholds: np.ndarray | float = 0.5  # multi_label: each label's
    clip: tuple[float, float] | None = None  # regression: data.label_range with data.clip_predictions

    def scores(self, logits: np.ndarray) -> np.ndarray:
        if self.task == REGRESSION:
            return regression_values(logits, self.clip)
        return sigmoid(logits) if self.task == MULTI_LABEL else softmax(logits)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        if self.task == REGRESSION:
            return scores
        if self.task == MULTI_LABEL:
            return decide_multi_label(scores, self.thresholds)
        return decide_single_label(scores, self.decision_threshold)


class Decides(Protocol):
    """A task's decisions: a torch Objective, or a Decider."""

    task: str

    def decide(self, scores: np.ndarray) -> np.ndarray: ...


def prediction_fields(decider: Decides, names: list[str], scores: np.ndarray) -> dict[str, Any]:
    """What one example's prediction reads as: single_label predicted_label, its probability and
    every class's; multi_label the predicted_labels (those at or above their thresholds) and every
    label's probability; regression the predicted number."""
    if decider.task == REGRESSION:
        return {"prediction": round(float(scores), 6)}
    probabilities = {name: round(float(p), 6) for name, p in zip(names, scores)}
    decided = decider.decide(scores[None, :])[0]
    if decider.task == MULTI_LABEL:
        return {"predicted_labels": [name for name, on in zip(names, decided) if on], "probabilities": probabilities}
    best = int(decided)
    return {"predicted_label": names[best], "probability": round(float(scores[best]), 6), "probabilities": probabilities}
