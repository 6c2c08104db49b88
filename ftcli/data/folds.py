"""K-fold cross-validation of the training split: which fold each training document falls in,
and a prepared dataset with one fold held out as validation (data.fold, written by `ftcli audit`).

Folds are cut from the tokenized (cached) training split, so every fold reuses one tokenization;
the cut is by document, so a long text's windows never straddle train and validation.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ftcli.config import FoldConfig
from ftcli.data.batching import column, with_column
from ftcli.errors import FtcliError
from ftcli import tasks

if TYPE_CHECKING:  # imported where a fold is cut: ftcli predict imports this module and needs no datasets
    from datasets import Dataset, DatasetDict

log = logging.getLogger("ftcli")


def document_ids(split: Dataset) -> np.ndarray:
    """Each row's document: its own index, or for windows (long_text: window) its doc column."""
    return np.asarray(column(split, "doc")) if "doc" in split.column_names else np.arange(len(split))


def labels_by_document(split: Dataset) -> np.ndarray | list:
    """Each document's label, in document order: its first row's (a long text's windows all carry
    it); a split tokenized as words (a tag per token) keeps its rows of tags, each as long as its row."""
    first_rows = np.unique(document_ids(split), return_index=True)[1]
    labels = column(split.select(first_rows), "labels")
    return labels if "word_ids" in split.column_names else np.asarray(labels)


def fold_of_documents(train: Dataset, task: str, fold: FoldConfig) -> np.ndarray:
    """The fold (0..folds-1) of every training document: shuffled by fold.seed, and for
    single_label stratified, so that each fold has the classes in the training split's proportions."""
    from sklearn.model_selection import KFold, StratifiedKFold

    labels = labels_by_document(train)
    count = len(labels)
    if count < fold.folds:
        raise FtcliError(
            f"{fold.folds} folds need at least {fold.folds} training examples, and there are {count}",
            "use fewer folds, or more training data",
        )
    assignment = np.empty(count, dtype=np.int64)
    stratified = tasks.get(task).stratified
    if stratified:
        classes, sizes = np.unique(labels, return_counts=True)
        if sizes.min() < fold.folds:
            log.warning(f"a class has {sizes.min()} training examples, fewer than the {fold.folds} folds: some folds lack it")
        splitter = StratifiedKFold(fold.folds, shuffle=True, random_state=fold.seed)
    else:
        splitter = KFold(fold.folds, shuffle=True, random_state=fold.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small class, said once above
        for index, (_, held_out) in enumerate(splitter.split(np.zeros(count), labels if stratified else None)):
            assignment[held_out] = index
    return assignment


def hold_out(splits: DatasetDict, task: str, fold: FoldConfig) -> tuple[DatasetDict, dict[str, np.ndarray]]:
    """The splits with training less fold `fold.index` as train and that fold as validation, and
    for both the training documents they hold (in order)."""
    train = splits["train"]
    assignment = fold_of_documents(train, task, fold)
    origin = {
        "train": np.flatnonzero(assignment != fold.index),
        "validation": np.flatnonzero(assignment == fold.index),
    }
    held = {split: select_documents(train, documents) for split, documents in origin.items()}
    others = {split: dataset for split, dataset in splits.items() if split not in held}
    from datasets import DatasetDict

    return DatasetDict({**others, **held}), origin


def select_documents(split: Dataset, documents: np.ndarray) -> Dataset:
    """The rows of these documents; windows' doc ids renumbered 0..len(documents)-1."""
    ids = document_ids(split)
    if "doc" not in split.column_names:
        return split.select(documents)
    renumber = np.full(ids.max() + 1, -1)
    renumber[documents] = np.arange(len(documents))
    rows = np.flatnonzero(renumber[ids] >= 0)
    return with_column(split.select(rows).remove_columns("doc"), "doc", renumber[ids[rows]].tolist())
