"""Batches: padding, batch orders, and a split kept padded on the device.

One padding routine (pad_rows, on padding.pad_array) serves the collate function of each step and
the whole split padded once onto the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ftcli.data.padding import pad_array

if TYPE_CHECKING:  # only annotations: ftcli predict batches rows without datasets (seconds to import)
    from datasets import Dataset

MODEL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")
# A window's document, and (token_classification) each of its tokens' place there or -1: no model input.
DOCUMENT_COLUMNS = ("doc", "doc_positions")
# A distilled student's training rows: its teacher's logits (a row per token for a tagger) and
# whether the row has a label (data.unlabeled's texts have placeholders): the loss's, no model input.
TEACHER_COLUMNS = ("teacher", "labeled")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def column(split: Any, name: str) -> list:
    """A split's column as a list. datasets 5 answers split[name] with a lazy Column, which numpy,
    torch and max() read one element at a time (43k ints: 2.3 s for np.asarray, 22 s for
    torch.tensor, against 0.01 and 0.03 s from the list it gives whole)."""
    return split[name][:]


def with_column(split: Dataset, name: str, values: Any) -> Dataset:
    """split with a column added. Its new fingerprint is drawn, not hashed: datasets would pickle
    every value to hash them (GoEmotions' 43k label vectors: seconds). An added column lives in
    memory and names no datasets cache file; ftcli's cache has its own key (data_fingerprint)."""
    from datasets.fingerprint import generate_random_fingerprint

    return split.add_column(name, values, new_fingerprint=generate_random_fingerprint())


def pad_rows(sequences: list[list[int]], length: int, value: int) -> torch.Tensor:
    """Sequences as one int64 tensor of `length` columns, padded with `value`."""
    return torch.from_numpy(pad_array(sequences, length, value))


def collate(
    features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows to the longest one (rounded up to a multiple when asked); labels
    and (for windows) document indices come along as their own tensors."""
    longest = max(len(row["input_ids"]) for row in features)
    if pad_to_multiple_of:
        longest = round_up(longest, pad_to_multiple_of)
    batch = {
        column: pad_rows([row[column] for row in features], longest, pad_token_id if column == "input_ids" else 0)
        for column in MODEL_COLUMNS
        if column in features[0]
    }
    if "labels" in features[0]:
        batch["labels"] = label_tensor([row["labels"] for row in features], longest)
    if "doc" in features[0]:  # long_text window: which document each window is of
        batch["doc"] = torch.tensor([row["doc"] for row in features], dtype=torch.long)
    if "doc_positions" in features[0]:  # and where its tokens go in it, padded as "reported by no window"
        batch["doc_positions"] = pad_rows([row["doc_positions"] for row in features], longest, -1)
    return batch | teacher_targets({name: [row[name] for row in features] for name in TEACHER_COLUMNS if name in features[0]}, longest)


def teacher_targets(columns: dict[str, list], width: int) -> dict[str, torch.Tensor]:
    """A distilled student's rows' teacher logits (a tagger's padded to `width` tokens with zeros,
    which no counted piece reads) and labelled flags, from their columns; nothing for other runs."""
    if "teacher" not in columns:
        return {}
    return {"teacher": teacher_tensor(columns["teacher"], width), "labeled": torch.tensor(columns["labeled"], dtype=torch.bool)}


def teacher_tensor(logits: list, width: int) -> torch.Tensor:
    """Rows of teacher logits as float32; rows of per-token rows padded to `width` tokens."""
    if logits and logits[0] and isinstance(logits[0][0], list):
        padded = torch.zeros(len(logits), width, len(logits[0][0]))
        for row, values in enumerate(logits):
            padded[row, : len(values)] = torch.tensor(values)
        return padded
    return torch.tensor(logits, dtype=torch.float32)


# A token's label the loss and the metrics skip: padding, special tokens, a word's later pieces.
IGNORE_LABEL = -100


def label_tensor(labels: list, width: int | None = None) -> torch.Tensor:
    """Class ids as int64; multi-label rows of 0/1 and regression targets as float32; rows of
    class ids (a tag per token) as int64 padded to `width` tokens with IGNORE_LABEL."""
    if labels and isinstance(labels[0], list) and all(isinstance(value, int) for row in labels for value in row):
        return pad_rows(labels, width or max(map(len, labels)), IGNORE_LABEL)
    values = torch.from_numpy(np.asarray(labels))  # 4x faster than torch.tensor on a list of rows; the same values
    return values.float() if values.is_floating_point() else values.long()


def length_grouped_order(lengths: np.ndarray, order: np.ndarray, batch_size: int, mega_batches: int = 50) -> np.ndarray:
    """Reorder a shuffled order so that each run of `batch_size` holds examples of similar length.

    The order is cut into mega-batches of `mega_batches` batches, each sorted by length, longest
    first: batches stay random in content across the epoch (which mega-batch, which neighbours)
    while carrying little padding, the same trade as HF's group_by_length.
    """
    size = batch_size * mega_batches
    chunks = [order[start : start + size] for start in range(0, len(order), size)]
    return np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in chunks])


class DeviceTensors:
    """A tokenized split padded once into tensors that live on the device, so a batch is an index
    gather there, with no collation or host-to-device copy per step. The batch's length comes from
    host-side lengths: no synchronisation."""

    def __init__(self, dataset: Dataset, pad_token_id: int, device: torch.device, pad_to_multiple_of: int | None = None) -> None:
        rows = dataset.with_format(None)
        self.lengths = np.asarray(column(rows, "length"))
        self.pad_to_multiple_of = pad_to_multiple_of
        self.width = int(self.lengths.max())
        if pad_to_multiple_of:
            self.width = round_up(self.width, pad_to_multiple_of)
        self.tensors = {
            name: pad_rows(column(rows, name), self.width, pad_token_id if name == "input_ids" else 0).to(device)
            for name in MODEL_COLUMNS
            if name in rows.column_names
        }
        self.tensors["labels"] = label_tensor(column(rows, "labels"), self.width).to(device)
        targets = teacher_targets({name: column(rows, name) for name in TEACHER_COLUMNS if name in rows.column_names}, self.width)
        self.tensors |= {name: values.to(device) for name, values in targets.items()}
        self.device = device

    @staticmethod
    def nbytes_for(dataset: Dataset) -> int:
        lengths = np.asarray(column(dataset, "length"))
        return int(len(lengths) * lengths.max() * 8 * len(MODEL_COLUMNS))

    def batch_length(self, indices: np.ndarray) -> int:
        length = int(self.lengths[indices].max())
        if self.pad_to_multiple_of:
            length = round_up(length, self.pad_to_multiple_of)
        return min(length, self.width)

    def batch(self, indices: np.ndarray, length: int | None = None) -> dict[str, torch.Tensor]:
        length = length or self.batch_length(indices)
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device, non_blocking=True)
        batch = {column: self.tensors[column].index_select(0, index)[:, :length] for column in self.model_columns}
        return batch | {"labels": self.labels(index, length)} | self.targets(index, length)

    @property
    def model_columns(self) -> list[str]:
        return [column for column in self.tensors if column in MODEL_COLUMNS]

    def targets(self, index: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """A distilled student's rows' teacher logits (a tagger's cut to `length` tokens) and
        labelled flags; nothing for other runs."""
        found = {name: self.tensors[name].index_select(0, index) for name in TEACHER_COLUMNS if name in self.tensors}
        if "teacher" in found and found["teacher"].dim() == 3:
            found["teacher"] = found["teacher"][:, :length]
        return found

    def labels(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """The rows' labels; a tag per token cut to the batch's `length` tokens, as its inputs are."""
        labels = self.tensors["labels"].index_select(0, index)
        return labels[:, :length] if labels.dim() == 2 and labels.dtype == torch.long else labels
