"""Batch order and padding in numpy, without torch: `batching` wraps them in tensors for PyTorch,
and prediction on an ONNX export (onnx_predict) feeds them to onnxruntime as they are."""

from __future__ import annotations

import numpy as np


def length_sorted_batches(lengths: list[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices in batches of similar length, longest first: little padding, and a too-large
    batch fails on the first batch rather than the last."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_array(sequences: list[list[int]], length: int, value: int) -> np.ndarray:
    """Sequences as one int64 array of `length` columns, padded with `value`."""
    padded = np.full((len(sequences), length), value, dtype=np.int64)
    for row, values in enumerate(sequences):
        padded[row, : len(values)] = values
    return padded
