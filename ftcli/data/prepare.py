"""Prepare: read a source's splits, check columns and labels, tokenize once, cache on disk.

The cache key is a fingerprint of the source, the tokenizer and every setting that changes the
tokens, so a second `prepare` (or `train`) is a cache hit and skips reading and tokenizing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from transformers import PreTrainedTokenizerBase

from ftcli.config import UNLABELED, DataConfig
from ftcli.data.batching import column, with_column
from ftcli.data.folds import hold_out
from ftcli.data.sources import HubDataset, Joined, LocalFiles, Source
from ftcli.data.words import prefix_spaced_backend, words_of
from ftcli.errors import FtcliError
from ftcli.fileio import cache_home
from ftcli.formats import Rows, check_texts, check_words
from ftcli import tasks

if TYPE_CHECKING:  # datasets is imported where a split is built or read: it takes seconds, and predict needs none
    from datasets import Dataset, DatasetDict

log = logging.getLogger("ftcli")

CACHE_FORMAT = 1  # bump when the prepared columns change, to invalidate old caches


@dataclass
class SplitSummary:
    size: int  # examples (documents)
    label_counts: dict[str, int]  # examples of each class (single_label) or with each label (multi_label)
    length_p50: float
    length_p95: float
    length_max: int
    truncated: int
    label_stats: dict[str, float] | None = None  # regression: mean, std, min, max of the targets
    windows: int | None = None  # long_text window: the rows the examples became
    windowed: int = 0  # long_text window: examples split into more than one window
    labelled: bool = True  # False: the unlabeled split (data.unlabeled), whose labels are placeholders: no counts


@dataclass
class Prepared:
    """Tokenized splits (columns: input_ids, [token_type_ids], attention_mask, labels, length)."""

    splits: DatasetDict
    label_names: list[str]  # classes or labels in id order; regression: the one output's name
    summary: dict[str, SplitSummary]
    fingerprint: str
    cache_dir: Path
    cache_hit: bool = field(default=False)
    # data.fold: the training documents (indices into the training split) train and validation hold
    origin: dict[str, np.ndarray] = field(default_factory=dict)


def source_for(data: DataConfig) -> Source:
    """Where data's examples come from: the Hub, or local files, or both (the Hub's splits and a
    local data.unlabeled file)."""
    files = LocalFiles(data.split_files(), data.quoting, data.format)
    if not data.hub:
        return files
    hub = HubDataset(data.hub, data.subset, data.label_field)
    return Joined((hub, files)) if files.files else hub


def load_raw_splits(data: DataConfig) -> tuple[dict[str, Rows], list[str] | None]:
    """The configured splits as rows, cut to max_train_samples / max_eval_samples (the unlabeled
    split whole: its texts only teach), and the label names a Hub dataset declares (None for local files)."""
    splits, hub_names = source_for(data).splits()
    limits = {split: {"train": data.max_train_samples, UNLABELED: None}.get(split, data.max_eval_samples) for split in splits}
    return {split: rows[: limits[split]] if limits[split] else rows for split, rows in splits.items()}, hub_names


def check_columns(splits: dict[str, Rows], data: DataConfig, task: str) -> None:
    """Every split has the text columns as strings and the label columns, each row a label that
    fits the task (multi_label: an example may have none); the unlabeled split the texts alone
    (any labels in it are never read)."""
    if "train" not in splits:
        raise FtcliError("the dataset has no train split", "set data.train")
    for split, rows in splits.items():
        if not rows:
            raise FtcliError(f"split '{split}' is empty", "check the file or max_*_samples")
        columns = list(rows[0])
        for column in list(data.text_fields) + (data.label_columns if split != UNLABELED else []):
            if column not in columns:
                key = "data.text_fields" if column in data.text_fields else "data.label_fields" if data.label_fields else "data.label_field"
                fix = f"set {key} to one of its columns"
                if column == data.label_field and split != "train":  # most likely texts to be labelled
                    fix += f", or leave the unlabelled file out of data.{split} and label it with ftcli predict RUN --input FILE"
                raise FtcliError(f"split '{split}' has no column '{column}' (columns: {', '.join(columns)})", fix)
        if split == UNLABELED:
            _check_inputs(rows, data, task, where=f"split '{split}'")
            continue
        if not tasks.get(task).token_level:  # words come as lists, which the task checks
            check_texts(rows, data.text_fields, where=f"split '{split}'")
        tasks.get(task).check_present(rows, data, where=f"split '{split}'")
        tasks.get(task).check_labels(rows, data, where=f"split '{split}'")


def _check_inputs(rows: Rows, data: DataConfig, task: str, where: str) -> None:
    """Texts without labels: strings, or a tagger's words (a list, or one text to cut into words)."""
    if tasks.get(task).token_level:
        check_words(rows, data.text_fields[0], where)
    else:
        check_texts(rows, data.text_fields, where)


# Tokenizers without a length limit report a huge model_max_length instead.
NO_LENGTH_LIMIT = 10**12


def check_max_length(max_length: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """Longer examples than the model's position embeddings hold would fail mid-training."""
    limit = tokenizer.model_max_length
    if limit < NO_LENGTH_LIMIT and max_length > limit:
        raise FtcliError(
            f"data.max_length={max_length} is longer than this model takes ({limit} tokens)",
            f"set data.max_length to {limit} or less",
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    # Which columns a call returns (token_type_ids or not) and which end truncation cuts.
    digest.update(json.dumps([list(tokenizer.model_input_names), tokenizer.truncation_side]).encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(_backend_state(tokenizer.backend_tokenizer).encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


def _backend_state(backend: Any) -> str:
    """A fast tokenizer's serialized state without its truncation and padding: every call sets
    those (ftcli passes its own), so left in, the fingerprint would change with the last call's
    max_length, and a saved tokenizer.json keeps whatever was last used. The serialization is
    deterministic (the vocabulary in id order), so it is hashed as it is: parsing and re-sorting
    its JSON took ~0.1-0.3 s of CPU per prepare."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def data_fingerprint(data: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str) -> str:
    """Hash of the source, the tokenizer, the task (it decides what a label becomes) and every
    setting that changes the tokens."""
    digest = hashlib.sha256(f"ftcli-cache-{CACHE_FORMAT}-{task}".encode())
    # The source fingerprints its own files (by content, not path) or Hub id.
    settings = data.model_dump(mode="json", exclude={"train", "validation", "test", UNLABELED, "fold"})  # a fold is cut from the cached splits
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(source_for(data).fingerprint().encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return cache_home() / "prepared"


class Columns:
    """Tokenized rows held as a list per column: the part of a datasets.Dataset that the forward
    passes and row_predictions read (column_names, a column, len, to_list, its rows in order),
    for ftcli predict, which builds no Dataset: importing datasets alone takes seconds."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, column: str) -> list:
        return self.columns[column]

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, values)) for values in zip(*self.columns.values())]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.to_list())


def tokenize_rows(rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Tokenize (pairs as pairs) in batches, without padding: batches pad later. A text longer
    than data.max_length is truncated, or with data.long_text: window split into windows that
    share data.stride tokens, each a row whose `doc` column is its example's index."""
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint

    columns = {column: [row[column] for row in rows] for column in data.text_fields}
    # A fingerprint given, datasets does not hash the function (with the tokenizer, its whole
    # vocabulary pickled: 0.3-0.8 s a split); an in-memory dataset is never cached under it, and
    # ftcli's cache has its own key (data_fingerprint).
    return Dataset.from_dict(columns).map(
        lambda batch, indices: _encoded_texts(batch, indices, data, tokenizer),
        batched=True, batch_size=1000, with_indices=True, remove_columns=list(data.text_fields),
        new_fingerprint=generate_random_fingerprint(),
    )


def text_columns(rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """tokenize_rows' columns as lists, in one batch (the same rows: each text is tokenized alone)."""
    columns = {column: [row[column] for row in rows] for column in data.text_fields}
    return _encoded_texts(columns, list(range(len(rows))), data, tokenizer)


def _encoded_texts(batch: dict[str, list], indices: list[int], data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """A batch of rows' texts (the rows at `indices`) tokenized as tokenize_rows says, by column."""
    texts = [batch[column] for column in data.text_fields]
    full = [len(ids) for ids in tokenizer(*texts, truncation=False, add_special_tokens=True)["input_ids"]]
    if data.long_text != "window":
        encoded = tokenizer(*texts, truncation=True, max_length=data.max_length)
        return dict(encoded) | {"length": [len(ids) for ids in encoded["input_ids"]], "full_length": full}
    _check_room(texts, indices, data, tokenizer)
    encoded = tokenizer(
        *texts, truncation="only_first" if len(texts) == 2 else True, max_length=data.max_length,
        stride=data.stride, return_overflowing_tokens=True,
    )
    origin = encoded.pop("overflow_to_sample_mapping")
    return dict(encoded) | {
        "length": [len(ids) for ids in encoded["input_ids"]],
        "full_length": [full[source] for source in origin],
        "doc": [indices[source] for source in origin],
    }


def tokenize_words(rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Rows of words (token_classification) tokenized as pre-split words, with each sub-token's
    word (`word_ids`, None for special tokens). A row whose words are one string (ftcli predict's
    text) is split by the tokenizer's pre-tokenizer, each word's characters kept (`spans`). A
    sentence longer than data.max_length is split into windows of whole words (`word_windows`),
    each a row with its sentence's index (`doc`) and each token's place in the sentence where this
    window is the one that reports it (`doc_positions`, -1 elsewhere); with long_text: truncate
    it is cut, with a warning counting what was cut. A split with no sentence too long gets no
    window columns: its rows are exactly those of a sentence tokenized whole."""
    from datasets import Dataset

    return Dataset.from_dict(word_columns(rows, data, tokenizer))


def word_columns(rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """tokenize_words' columns as lists: the server tokenizes a request's texts so, without the
    tenth of a second a Dataset's fingerprint costs."""
    words, spans = words_of([row[data.text_fields[0]] for row in rows], tokenizer)
    tokenizer = prefix_spaced(tokenizer)
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data.max_length)
    whole = tokenizer(words, is_split_into_words=True, truncation=False)
    full = [len(ids) for ids in whole["input_ids"]]
    word_ids = [encoded.word_ids(index) for index in range(len(words))]
    columns = dict(encoded) | {"length": [len(ids) for ids in encoded["input_ids"]], "full_length": full, "word_ids": word_ids}
    if any(split is not None for split in spans):
        columns["spans"] = [[list(span) for span in found or []] for found in spans]
    if data.long_text == "truncate":
        _warn_cut(words, word_ids, data.max_length)
    elif max(full, default=0) > data.max_length:
        columns = _windowed(columns, whole, data)
    return columns


def word_windows(pieces: list[int], room: int, stride: int) -> list[tuple[int, int]]:
    """The windows (first word, word after the last) of a sentence whose words have `pieces`
    sub-tokens each: as many whole words as `room` pieces hold, each window sharing with the one
    before the fewest last words that make `stride` pieces or more, fewer where the next word
    would not fit beside them. A word of more pieces than the room is a window alone (its first
    `room` pieces: its tag sits on the first)."""
    windows, start = [], 0
    while True:
        end, used = start, 0
        while end < len(pieces) and used + pieces[end] <= room:
            used, end = used + pieces[end], end + 1
        end = max(end, start + 1)
        windows.append((start, end))
        if end >= len(pieces):
            return windows
        start, shared = end, 0
        while start - 1 > windows[-1][0] and shared < stride and shared + pieces[start - 1] + pieces[end] <= room:
            start, shared = start - 1, shared + pieces[start - 1]


def central_windows(pieces: list[int], windows: list[tuple[int, int]]) -> list[int]:
    """For each word, the window it is most central in: the one with the most pieces between the
    word and the window's nearer edge; the earlier window on a tie. (A sentence's own start and
    end need no exception: a word's later window always reaches further past it.)"""
    starts = np.concatenate([[0], np.cumsum(pieces)])
    owner, best = [-1] * len(pieces), [-1] * len(pieces)
    for index, (first, end) in enumerate(windows):
        for word in range(first, end):
            room_around = int(min(starts[word] - starts[first], starts[end] - starts[word + 1]))
            if room_around > best[word]:
                owner[word], best[word] = index, room_around
    return owner


def _windowed(columns: dict[str, list], whole: Any, data: DataConfig) -> dict[str, list]:
    """Every sentence as rows: one that fits as it was tokenized (reporting each of its tokens),
    a longer one as its windows (`_sentence_windows`), each row with `doc` and `doc_positions`."""
    rows: dict[str, list] = {column: [] for column in [*columns, "doc", "doc_positions"]}
    for sentence, length in enumerate(columns["full_length"]):
        if length <= data.max_length:
            for column in columns:
                rows[column].append(columns[column][sentence])
            rows["doc"].append(sentence)
            rows["doc_positions"].append(list(range(columns["length"][sentence])))
            continue
        for places, reported in _sentence_windows(whole.word_ids(sentence), data, sentence):
            for column in columns:
                value = columns[column][sentence]
                if column in whole:  # the model's inputs: the sentence's tokens at the window's places
                    value = [whole[column][sentence][place] for place in places]
                rows[column].append(value)
            rows["word_ids"][-1] = [whole.word_ids(sentence)[place] for place in places]
            rows["length"][-1] = len(places)
            rows["doc"].append(sentence)
            rows["doc_positions"].append([place if keep else -1 for place, keep in zip(places, reported)])
    return rows


def _sentence_windows(word_ids: list[int | None], data: DataConfig, sentence: int) -> list[tuple[list[int], list[bool]]]:
    """A long sentence's windows as places in its whole tokenization (the special tokens around
    it, then whole words' pieces), and which places each window reports: its words' pieces where it
    is their most central window, the leading special tokens in the first window, the trailing ones
    in the last."""
    content = [place for place, word in enumerate(word_ids) if word is not None]  # one run: words' pieces follow each other
    lead, trail = list(range(content[0])), list(range(content[-1] + 1, len(word_ids)))
    room = data.max_length - len(lead) - len(trail)
    if room < 1:
        raise FtcliError(
            f"sentence {sentence + 1}: data.max_length={data.max_length} leaves no room for a word beside the "
            f"{len(lead) + len(trail)} special tokens", "raise data.max_length",
        )
    pieces = np.bincount([word_ids[place] for place in content]).tolist()
    starts = np.concatenate([[0], np.cumsum(pieces)])
    windows = word_windows(pieces, room, data.stride)
    owner = central_windows(pieces, windows)
    result = []
    for index, (first, end) in enumerate(windows):
        places = content[starts[first] : starts[end]][:room]
        reported = [index == 0] * len(lead) + [owner[word_ids[place]] == index for place in places] + [index == len(windows) - 1] * len(trail)
        result.append((lead + places + trail, reported))
    return result


def prefix_spaced(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, or for byte-level BPE a copy that reads each pre-split word as following a
    space (words.prefix_spaced_backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spaced = prefix_spaced_backend(backend) if backend is not None else None
    if spaced is None:
        return tokenizer
    copied = copy.deepcopy(tokenizer)
    copied._tokenizer = spaced
    return copied


def _warn_cut(words: list[list[str]], word_ids: list[list[int | None]], max_length: int) -> None:
    """How many sentences (and their words) data.max_length cut: those words get no tag."""
    kept = [max((word for word in ids if word is not None), default=-1) + 1 for ids in word_ids]
    cut = [len(sentence) - count for sentence, count in zip(words, kept) if count < len(sentence)]
    if cut:
        log.warning(
            "%d sentences are longer than data.max_length=%d tokens: their last %d words were cut (untagged); "
            "raise data.max_length to keep them", len(cut), max_length, sum(cut),
        )


def tokenize_for(task: str, rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Rows tokenized as `task` reads them: texts (tokenize_rows), or words (tokenize_words)."""
    return (tokenize_words if tasks.get(task).token_level else tokenize_rows)(rows, data, tokenizer)


def tokenize_columns(task: str, rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Columns:
    """tokenize_for's rows as Columns, without datasets: the same columns and values (ftcli predict)."""
    return Columns((word_columns if tasks.get(task).token_level else text_columns)(rows, data, tokenizer))


def label_values(column: list, task: str) -> Any:
    """A split's labels as the task summarises them: an array, or (a label per token) the lists."""
    return column if tasks.get(task).token_level else np.asarray(column)


def _check_room(texts: list[list[str]], indices: list[int], data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A window holds the special tokens and (pairs) the whole second text: what is left of
    max_length for the first text must be more than the stride, or windows cannot advance."""
    room = [data.max_length - tokenizer.num_special_tokens_to_add(pair=len(texts) == 2)] * len(indices)
    if len(texts) == 2:
        room = [left - len(ids) for left, ids in zip(room, tokenizer(texts[1], add_special_tokens=False)["input_ids"])]
    tightest = int(np.argmin(room))
    if room[tightest] <= data.stride:
        raise FtcliError(
            f"row {indices[tightest] + 1}: a window of data.max_length={data.max_length} tokens leaves "
            f"{max(room[tightest], 0)} for the windowed text, not more than data.stride={data.stride}"
            + (" (the second text is kept whole)" if len(texts) == 2 else ""),
            "raise data.max_length or lower data.stride",
        )


def prepare(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    use_cache: bool = True,
    on_labels: Callable[[list[str]], None] | None = None,
) -> Prepared:
    """Tokenized splits for `task`, from the cache when the fingerprint matches, else built and
    cached. on_labels hears the label names as soon as they are known, before the splits are
    tokenized (so the model can load meanwhile)."""
    check_max_length(data.max_length, tokenizer)
    fingerprint = data_fingerprint(data, tokenizer, task)
    cache_dir = cache_root() / fingerprint
    on_labels = on_labels or (lambda names: None)
    prepared = _load_cached(cache_dir, fingerprint) if use_cache and (cache_dir / "meta.json").is_file() else None
    if prepared is not None:
        on_labels(prepared.label_names)
    else:
        prepared = _build(data, tokenizer, task, fingerprint, cache_dir, on_labels)
        if use_cache:
            _save_cache(prepared)
    return _hold_out_fold(prepared, data, task) if data.fold is not None else prepared


def _build(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str, fingerprint: str, cache_dir: Path,
    on_labels: Callable[[list[str]], None],
) -> Prepared:
    raw, hub_names = load_raw_splits(data)
    check_columns(raw, data, task)
    label_names = tasks.get(task).resolve_label_names(raw["train"], data, hub_names)
    on_labels(label_names)
    splits, summary = {}, {}
    for split, rows in raw.items():
        splits[split], summary[split] = _prepare_split(split, rows, data, tokenizer, task, label_names)
    from datasets import DatasetDict

    return Prepared(DatasetDict(splits), label_names, summary, fingerprint, cache_dir)


def _prepare_split(
    split: str, rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str, label_names: list[str]
) -> tuple[Dataset, SplitSummary]:
    """A split tokenized with its labels, and its summary. The unlabeled split's labels are the
    task's placeholders, of the real labels' shape and type, so that it is batched as train is."""
    if split == UNLABELED:
        rows = _as_words(rows, data, tokenizer) if tasks.get(task).token_level else rows
        labels = tasks.get(task).placeholder_labels(rows, data, label_names)
    else:
        labels = tasks.get(task).encode(rows, data, label_names, where=f"split '{split}'")
    if split == "train":
        tasks.get(task).check_training_labels(labels, label_names)
    tokenized = tokenize_for(task, rows, data, tokenizer)
    if "doc" in tokenized.column_names:  # windows: each its document's label
        labels = [labels[doc] for doc in column(tokenized, "doc")]
    if tasks.get(task).token_level:  # a tag per sub-token, from each word's
        positions = column(tokenized, "doc_positions") if "doc_positions" in tokenized.column_names else None
        labels = tasks.get(task).align_labels(labels, column(tokenized, "word_ids"), data, label_names, positions)
    tokenized = with_column(tokenized, "labels", labels)
    summary = _summarize(tokenized, label_names, task, data.long_text == "window", labelled=split != UNLABELED)
    return tokenized.remove_columns("full_length"), summary


def _as_words(rows: Rows, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Rows:
    """A tagger's texts as lists of words, a text given as one string cut as ftcli predict cuts
    it: its placeholder tags are one per word."""
    words = words_of([row[data.text_fields[0]] for row in rows], tokenizer)[0]
    return [{data.text_fields[0]: sentence} for sentence in words]


def _hold_out_fold(prepared: Prepared, data: DataConfig, task: str) -> Prepared:
    """data.fold: training less the fold as train, the fold as validation."""
    splits, origin = hold_out(prepared.splits, task, data.fold)
    summary = dict(prepared.summary)
    for split in origin:
        # The cache keeps no untruncated lengths: a fold counts the examples cut at max_length.
        lengths = with_column(splits[split], "full_length", column(splits[split], "length"))
        summary[split] = _summarize(lengths, prepared.label_names, task, data.long_text == "window")
        if data.long_text == "truncate":
            summary[split].truncated = int((np.asarray(column(lengths, "length")) >= data.max_length).sum())
    return replace(prepared, splits=splits, summary=summary, origin=origin)


def split_rows(data: DataConfig, prepared: Prepared, split: str) -> Rows:
    """A split's rows as read from its source, in the prepared split's document order (a fold's
    rows come from the training split)."""
    raw = load_raw_splits(data)[0]
    if split in prepared.origin:
        return [raw["train"][int(index)] for index in prepared.origin[split]]
    return raw[split]


def _summarize(tokenized: Dataset, label_names: list[str], task: str, windowing: bool = False, labelled: bool = True) -> SplitSummary:
    """A split's documents, labels and lengths. windowing: long_text window, where a tagger's split
    with no sentence too long is still reported as windows (one per sentence), none split.
    labelled: False for the unlabeled split, whose placeholder labels are not counted."""
    token_level = tasks.get(task).token_level
    windows, windowed = (len(tokenized), 0) if windowing and token_level else (None, 0)
    # A tagger's windows each tag the words they report, once: its labels are counted over them all.
    labels = label_values(column(tokenized, "labels"), task) if token_level else None
    if "doc" in tokenized.column_names:  # one row per window: summarise the documents
        docs = np.asarray(column(tokenized, "doc"))
        windows, windowed = len(docs), int((np.bincount(docs) > 1).sum())
        first = np.unique(docs, return_index=True)[1]
        tokenized = tokenized.select(first)
    full = np.asarray(column(tokenized, "full_length"))
    lengths = np.asarray(column(tokenized, "length")) if windows is None else full  # windows cut nothing
    counts, stats = ({}, None) if not labelled else tasks.get(task).label_counts(
        label_values(column(tokenized, "labels"), task) if labels is None else labels, label_names
    )
    return SplitSummary(
        size=len(tokenized),
        label_counts=counts,
        length_p50=float(np.percentile(full, 50)),
        length_p95=float(np.percentile(full, 95)),
        length_max=int(full.max()),
        truncated=int((full > lengths).sum()),
        label_stats=stats,
        windows=windows,
        windowed=windowed,
        labelled=labelled,
    )


def _save_cache(prepared: Prepared) -> None:
    """Write to a temporary folder, then rename: a crash never leaves a half cache behind."""
    prepared.cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prepared.fingerprint}-", dir=prepared.cache_dir.parent))
    try:
        prepared.splits.save_to_disk(str(staging / "splits"))
        meta = {
            "label_names": prepared.label_names,
            "summary": {split: asdict(summary) for split, summary in prepared.summary.items()},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            staging.rename(prepared.cache_dir)
        except OSError:  # another process cached the same fingerprint first: theirs is as good
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_cached(cache_dir: Path, fingerprint: str) -> Prepared | None:
    """The cached splits; None when the cache entry is damaged (a disk that filled while it was
    written, a copy cut short), deleted so that the splits are tokenized and cached again."""
    from datasets import load_from_disk

    try:
        meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
        splits = load_from_disk(str(cache_dir / "splits"))
        summary = {split: SplitSummary(**values) for split, values in meta["summary"].items()}
        # Arrow data cut at a batch boundary reads as fewer rows without an error.
        short = [name for name, split in splits.items() if len(split) != (summary[name].windows or summary[name].size)]
        if short:
            raise ValueError(f"split '{short[0]}' has fewer rows than were cached")
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSON's, arrow's, datasets', a meta.json of other keys
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        log.warning("the tokenization cache %s is damaged (%s); tokenizing again", cache_dir, reason)
        shutil.rmtree(cache_dir, ignore_errors=True)
        return None
    return Prepared(splits, meta["label_names"], summary, fingerprint, cache_dir, cache_hit=True)


def baselines(prepared: Prepared, task: str) -> dict[str, Any] | None:
    """What a model that learned nothing would score on validation, for reading the curves: the
    loss of the best constant guess (chance_loss), and for single_label the accuracy of always
    predicting the training set's most common class."""
    summary = prepared.summary
    if "train" not in summary or "validation" not in summary:
        return None
    train, validation = prepared.splits["train"], prepared.splits["validation"]
    return tasks.get(task).baseline(
        label_values(column(train, "labels"), task), label_values(column(validation, "labels"), task), summary, prepared.label_names
    )
