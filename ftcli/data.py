"""Data: read local files or the Hub, check columns and labels, tokenize once, cache on disk.

The cache key is a fingerprint of the raw data, the tokenizer and every setting that changes the
tokens, so a second `prepare` (or `train`) is a cache hit and skips reading and tokenizing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from ftcli.config import DataConfig
from ftcli import hub
from ftcli.errors import FtcliError

CACHE_FORMAT = 1  # bump when the prepared columns change, to invalidate old caches
MODEL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class SplitSummary:
    size: int
    label_counts: dict[str, int]
    length_p50: float
    length_p95: float
    length_max: int
    truncated: int


@dataclass
class Prepared:
    """Tokenized splits (columns: input_ids, [token_type_ids], attention_mask, labels, length)."""

    splits: DatasetDict
    label_names: list[str]
    summary: dict[str, SplitSummary]
    fingerprint: str
    cache_dir: Path
    cache_hit: bool = field(default=False)


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path, quoting: str = "auto") -> list[dict[str, Any]]:
    """Rows of a jsonl, json, csv, tsv or parquet file as dicts; every malformation is an FtcliError.
    quoting: how csv and tsv files quote their fields (data.quoting)."""
    path = require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",", quoting)
    elif suffix in (".jsonl", ".json"):
        rows = _read_json(path)
    else:
        raise FtcliError(f"unsupported file type '{suffix}' ({path})", "use .jsonl, .json, .csv, .tsv or .parquet")
    if not rows:
        raise FtcliError(f"data file {path} holds no rows", "fill it, or remove it from the config")
    return rows


def require_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FtcliError(f"data file {path} is a directory", "point at a file")
    if not path.is_file():
        raise FtcliError(f"data file {path} does not exist", "check the path in data.* or --input")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise FtcliError(
            f"{path} is not UTF-8 (bad byte at line {line})", "re-save it as UTF-8, e.g. iconv -t UTF-8"
        ) from None


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise FtcliError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}", "fix the file") from None
        return _check_objects(rows, path)
    rows = []
    for number, line in enumerate(file_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise FtcliError(
                f"{path}: line {number} is not valid JSON ({error.msg})", "write one JSON object per line"
            ) from None
    return _check_objects(rows, path)


def _check_objects(rows: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise FtcliError(f"{path} must hold JSON objects, one per row", 'e.g. {"text": "...", "label": 0}')
    return rows


def _read_delimited(path: Path, delimiter: str, quoting: str) -> list[dict[str, Any]]:
    """A csv or tsv file as rows, each line one row unless quoting says that quotes may span lines.

    Both kinds exist: pandas and spreadsheets wrap a field holding a quote in quotes (GoEmotions'
    tsv files), while GLUE's tsv files have no quoting and a sentence may begin with a literal
    quote. Read as quoted, such a sentence swallows the lines up to the next quote. auto reads
    quoted when every quote in the file sits in a well-formed quoted field (csv's strict mode),
    else unquoted; and rather than join lines silently, it stops when a quoted field spans lines.
    """
    text = _read_text(path)
    if quoting == "none":
        return _rows(path, _unquoted_records(text, delimiter), delimiter)
    records = _quoted_records(path, text, delimiter, strict=quoting == "auto")
    if records is None:  # auto: some quote is plain text
        return _rows(path, _unquoted_records(text, delimiter), delimiter)
    if quoting == "auto":
        spanning = next(((start, end) for start, end, _ in records if end > start), None)
        if spanning:
            start, end = spanning
            raise FtcliError(
                f"{path}: a quote at line {start} opens a field that runs to line {end}, joining {end - start + 1} "
                "lines into one row",
                "set data.quoting: none if quotes in this file are plain text (as in GLUE's tsv files), or "
                "data.quoting: quoted if its quoted fields hold line breaks",
            )
    return _rows(path, records, delimiter)


def _quoted_records(path: Path, text: str, delimiter: str, strict: bool) -> list[tuple[int, int, list[str]]] | None:
    """(first line, last line, fields) of each record read with quoting; None when strict and some
    quote is not part of a well-formed quoted field."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=strict)
    records, line = [], 0
    try:
        for values in reader:
            records.append((line + 1, reader.line_num, values))
            line = reader.line_num
    except csv.Error as error:
        if strict:
            return None
        raise FtcliError(f"{path}: line {reader.line_num} cannot be read ({error})", "check its quotes") from None
    return records


def _unquoted_records(text: str, delimiter: str) -> list[tuple[int, int, list[str]]]:
    return [(number, number, line.split(delimiter)) for number, line in enumerate(file_lines(text), start=1)]


def file_lines(text: str) -> list[str]:
    """The lines of a text file, split at line ends only: str.splitlines also splits at characters
    such as U+2028 that real texts (Reddit comments, say) hold inside a line."""
    return re.split(r"\r\n|\r|\n", text.removesuffix("\n").removesuffix("\r"))


def _rows(path: Path, records: list[tuple[int, int, list[str]]], delimiter: str) -> list[dict[str, Any]]:
    """Records under the first one's names; blank lines are skipped, a ragged record is an error."""
    records = [record for record in records if record[2] not in ([], [""])]
    if not records:
        return []
    (_, _, header), *body = records
    for start, end, values in body:
        if len(values) != len(header):
            if end > start:
                fix = f"its quote runs to line {end}: set data.quoting: none if quotes in this file are plain text"
            else:
                fix = "quote fields that contain the delimiter" if delimiter == "," else "a tab inside a text must be quoted"
            raise FtcliError(f"{path}: line {start} has {len(values)} fields but the header has {len(header)}", fix)
    return [dict(zip(header, values)) for _, _, values in body]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise FtcliError(f"{path} is not a readable parquet file ({error})", "re-export it") from None


# ---------------------------------------------------------------- splits and labels


def load_raw_splits(data: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
    """The configured splits as rows, cut to max_train_samples / max_eval_samples, and the
    label names a Hub dataset declares (None for local files)."""
    if data.hub:
        splits, hub_names = _load_hub(data)
    else:
        splits, hub_names = {split: read_records(path, data.quoting) for split, path in data.split_files().items()}, None
    limits = {split: data.max_train_samples if split == "train" else data.max_eval_samples for split in splits}
    return {split: rows[: limits[split]] if limits[split] else rows for split, rows in splits.items()}, hub_names


def _load_hub(data: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
    from datasets import ClassLabel, load_dataset

    offline = hub.offline()
    try:
        loaded = load_dataset(data.hub, data.subset)
    except Exception as error:  # network, unknown id, missing subset: all mean "not loadable"
        hint = (
            "the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1) and the dataset is not in the "
            "Hub cache: use local files in data.train/validation/test"
            if offline
            else "check data.hub and data.subset"
        )
        raise FtcliError(f"cannot load Hub dataset '{data.hub}' ({type(error).__name__})", hint) from None
    splits = {}
    names = None
    for split, dataset in loaded.items():
        feature = dataset.features.get(data.label_field)
        if isinstance(feature, ClassLabel):
            names = feature.names
        rows = dataset.to_list()
        if rows and all(row.get(data.label_field) == -1 for row in rows):
            continue  # an unlabeled split (GLUE's test): nothing to train or score on
        splits[split] = rows
    return splits, names


def check_columns(splits: dict[str, list[dict[str, Any]]], data: DataConfig, require_labels: bool = True) -> None:
    """Every split has the text columns as strings, and the label column, with no nulls."""
    if "train" not in splits:
        raise FtcliError("the dataset has no train split", "set data.train")
    for split, rows in splits.items():
        if not rows:
            raise FtcliError(f"split '{split}' is empty", "check the file or max_*_samples")
        columns = list(rows[0])
        wanted = list(data.text_fields) + ([data.label_field] if require_labels else [])
        for column in wanted:
            if column not in columns:
                key = "data.label_field" if column == data.label_field else "data.text_fields"
                fix = f"set {key} to one of its columns"
                if column == data.label_field and split != "train":  # most likely texts to be labelled
                    fix += f", or leave the unlabelled file out of data.{split} and label it with ftcli predict RUN --input FILE"
                raise FtcliError(f"split '{split}' has no column '{column}' (columns: {', '.join(columns)})", fix)
        check_texts(rows, data.text_fields, where=f"split '{split}'")
        if require_labels:
            for number, row in enumerate(rows, start=1):
                label = row.get(data.label_field)
                if label is None or (isinstance(label, str) and not label.strip()):  # csv has no null but ""
                    raise FtcliError(
                        f"split '{split}' row {number}: label '{data.label_field}' is missing or null",
                        "give every row a label",
                    )
            check_label_kinds(rows, data.label_field, where=f"split '{split}'")


def check_texts(rows: list[dict[str, Any]], text_fields: list[str], where: str) -> None:
    for number, row in enumerate(rows, start=1):
        for column in text_fields:
            value = row.get(column)
            if not isinstance(value, str):
                problem = "missing or null" if value is None else f"a {type(value).__name__}, not text"
                raise FtcliError(f"{where} row {number}: '{column}' is {problem}", "every text field must be a string")


def resolve_label_names(splits: dict[str, list[dict[str, Any]]], data: DataConfig, hub_names: list[str] | None) -> list[str]:
    """data.label_names, else the Hub's ClassLabel names, else the training labels sorted (ids
    numerically, whether they came as numbers or as text)."""
    if data.label_names:
        return list(data.label_names)
    if hub_names:
        return list(hub_names)
    labels = [label_value(row[data.label_field]) for row in splits["train"]]
    if all(isinstance(label, int) for label in labels):
        return [str(label) for label in sorted(set(labels))]
    return sorted(set(map(str, labels)))


# A label written as a whole number, as JSON or as text ("1", and "1.0" as pandas writes ints beside a gap).
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def label_value(value: Any) -> int | str | float | list | dict:
    """A label as ftcli reads it: an id (int) whether written as a number or as text, a class name
    (str), or something a single-label classifier cannot take: a fractional number, a list."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):  # as a JSON boolean reads
            return text.lower()
        if _INTEGER.fullmatch(text):
            return int(float(text))
        if _NUMBER.fullmatch(text):
            return float(text)
        return value
    return value


def check_label_kinds(rows: list[dict[str, Any]], label_field: str, where: str) -> None:
    """One clear line for a label column that does not hold one class per example: several labels
    (lists), scores (fractional numbers), or ids and names mixed."""
    first_of: dict[str, tuple[int, Any]] = {}
    for number, row in enumerate(rows, start=1):
        value = label_value(row[label_field])
        kind = "id" if isinstance(value, int) else "name" if isinstance(value, str) else "score" if isinstance(value, float) else "many"
        first_of.setdefault(kind, (number, row[label_field]))
    if "many" in first_of:
        number, value = first_of["many"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is a {type(value).__name__}, not one class",
            "several labels per example (multi-label classification) are not supported yet: give each row one label",
        )
    if "score" in first_of:
        number, value = first_of["score"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is a number with a fraction: a score, not a class",
            "predicting a score (regression) is not supported yet; classes are names or whole-number ids",
        )
    if "id" in first_of and "name" in first_of:
        (id_row, an_id), (name_row, a_name) = first_of["id"], first_of["name"]
        raise FtcliError(
            f"{where}: labels mix numbers and names (row {id_row}: {an_id!r}, row {name_row}: {a_name!r})",
            "write every label as a name, or every label as an id 0..N-1 with the names in data.label_names",
        )


def encode_labels(rows: list[dict[str, Any]], label_field: str, label_names: list[str], where: str) -> list[int]:
    """Label ids: names map by position; ids (as numbers or as text) are positions unless the names
    themselves are numbers, in which case ids map by name."""
    index = {name: position for position, name in enumerate(label_names)}
    numeric_names = _all_numeric(label_names)
    ids = []
    for number, row in enumerate(rows, start=1):
        value = label_value(row[label_field])
        if str(value) in index:
            ids.append(index[str(value)])
        elif isinstance(value, int) and not numeric_names and 0 <= value < len(label_names):
            ids.append(value)
        else:
            raise FtcliError(
                f"{where} row {number}: label {row[label_field]!r} is not one of data.label_names {label_names}",
                "fix the label, or list every class in data.label_names",
            )
    return ids


def _all_numeric(names: list[str]) -> bool:
    return all(_INTEGER.fullmatch(name.strip()) for name in names)


# ---------------------------------------------------------------- tokenizing and caching


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
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        # Every call sets these (ftcli passes its own): left in, the fingerprint would change with
        # the last call's max_length, and a saved tokenizer.json keeps whatever was last used.
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


def data_fingerprint(data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the raw files (or Hub id), the tokenizer and every token-changing setting."""
    digest = hashlib.sha256(f"ftcli-cache-{CACHE_FORMAT}".encode())
    # Local paths are left out: the same bytes under another path are the same data.
    settings = data.model_dump(mode="json", exclude={"train", "validation", "test"})
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for split, path in data.split_files().items():
        digest.update(split.encode())
        digest.update(file_sha256(require_file(path)).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def cache_root() -> Path:
    return Path(os.environ.get("FTCLI_CACHE", Path.home() / ".cache" / "ftcli")) / "prepared"


def tokenize_rows(
    rows: list[dict[str, Any]], text_fields: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset:
    """Tokenize (pairs as pairs) with truncation, in batches, without padding: batches pad later."""
    columns = {column: [row[column] for row in rows] for column in text_fields}
    dataset = Dataset.from_dict(columns)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[column] for column in text_fields]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        full = tokenizer(*texts, truncation=False, add_special_tokens=True)["input_ids"]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        encoded["full_length"] = [len(ids) for ids in full]
        return dict(encoded)

    return dataset.map(encode, batched=True, batch_size=1000, remove_columns=list(text_fields))


def prepare(data: DataConfig, tokenizer: PreTrainedTokenizerBase, use_cache: bool = True) -> Prepared:
    """Tokenized splits, from the cache when the fingerprint matches, else built and cached."""
    check_max_length(data.max_length, tokenizer)
    fingerprint = data_fingerprint(data, tokenizer)
    cache_dir = cache_root() / fingerprint
    if use_cache and (cache_dir / "meta.json").is_file():
        return _load_cached(cache_dir, fingerprint)

    raw, hub_names = load_raw_splits(data)
    check_columns(raw, data)
    label_names = resolve_label_names(raw, data, hub_names)
    splits, summary = {}, {}
    for split, rows in raw.items():
        labels = encode_labels(rows, data.label_field, label_names, where=f"split '{split}'")
        if split == "train" and len(set(labels)) < 2:
            raise FtcliError(
                f"the training set has only one class ({label_names[labels[0]]})",
                "a classifier needs examples of at least two classes",
            )
        tokenized = tokenize_rows(rows, data.text_fields, tokenizer, data.max_length).add_column("labels", labels)
        summary[split] = _summarize(tokenized, label_names)
        splits[split] = tokenized.remove_columns("full_length")
    prepared = Prepared(DatasetDict(splits), label_names, summary, fingerprint, cache_dir)
    if use_cache:
        _save_cache(prepared)
    return prepared


def _summarize(tokenized: Dataset, label_names: list[str]) -> SplitSummary:
    full = np.asarray(tokenized["full_length"])
    lengths = np.asarray(tokenized["length"])
    counts = Counter(tokenized["labels"])
    return SplitSummary(
        size=len(tokenized),
        label_counts={name: counts.get(index, 0) for index, name in enumerate(label_names)},
        length_p50=float(np.percentile(full, 50)),
        length_p95=float(np.percentile(full, 95)),
        length_max=int(full.max()),
        truncated=int((full > lengths).sum()),
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


def _load_cached(cache_dir: Path, fingerprint: str) -> Prepared:
    meta = json.loads((cache_dir / "meta.json").read_text())
    splits = load_from_disk(str(cache_dir / "splits"))
    summary = {split: SplitSummary(**values) for split, values in meta["summary"].items()}
    return Prepared(splits, meta["label_names"], summary, fingerprint, cache_dir, cache_hit=True)


# ---------------------------------------------------------------- batching


def collate(
    features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows to the longest one (rounded up to a multiple when asked)."""
    longest = max(len(row["input_ids"]) for row in features)
    if pad_to_multiple_of:
        longest = round_up(longest, pad_to_multiple_of)
    batch: dict[str, torch.Tensor] = {}
    for column in MODEL_COLUMNS:
        if column not in features[0]:
            continue
        pad_value = pad_token_id if column == "input_ids" else 0
        padded = np.full((len(features), longest), pad_value, dtype=np.int64)
        for position, row in enumerate(features):
            values = row[column]
            padded[position, : len(values)] = values
        batch[column] = torch.from_numpy(padded)
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([row["labels"] for row in features], dtype=torch.long)
    return batch


def length_sorted_batches(lengths: list[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices in batches of similar length, longest first: little padding, and a too-large
    batch fails on the first batch rather than the last."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
        self.lengths = np.asarray(rows["length"])
        self.pad_to_multiple_of = pad_to_multiple_of
        self.width = int(self.lengths.max())
        if pad_to_multiple_of:
            self.width = round_up(self.width, pad_to_multiple_of)
        self.tensors = {
            column: self._pad(rows[column], self.width, pad_token_id if column == "input_ids" else 0).to(device)
            for column in MODEL_COLUMNS
            if column in rows.column_names
        }
        self.tensors["labels"] = torch.tensor(rows["labels"], dtype=torch.long, device=device)
        self.device = device

    @staticmethod
    def _pad(sequences: list[list[int]], longest: int, value: int) -> torch.Tensor:
        padded = np.full((len(sequences), longest), value, dtype=np.int64)
        for row, values in enumerate(sequences):
            padded[row, : len(values)] = values
        return torch.from_numpy(padded)

    @staticmethod
    def nbytes_for(dataset: Dataset) -> int:
        lengths = np.asarray(dataset["length"])
        return int(len(lengths) * lengths.max() * 8 * len(MODEL_COLUMNS))

    def batch_length(self, indices: np.ndarray) -> int:
        length = int(self.lengths[indices].max())
        if self.pad_to_multiple_of:
            length = round_up(length, self.pad_to_multiple_of)
        return min(length, self.width)

    def batch(self, indices: np.ndarray, length: int | None = None) -> dict[str, torch.Tensor]:
        length = length or self.batch_length(indices)
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device, non_blocking=True)
        batch = {column: values.index_select(0, index)[:, :length] for column, values in self.tensors.items() if column != "labels"}
        batch["labels"] = self.tensors["labels"].index_select(0, index)
        return batch
