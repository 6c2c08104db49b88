"""Labels: what a label column holds, whether it fits the task, the label names, and each
example's label as the model trains on it: a class id (single_label), one 0/1 value per label
(multi_label) or a number (regression).

Ids mean the same whether a file holds them as numbers (jsonl, parquet) or as text (csv, tsv).
When the data contradicts the task, one line says what was found and which task fits it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftcli.config import DataConfig
from ftcli.errors import FtcliError
from ftcli.formats import Rows
from ftcli.tasks import MULTI_LABEL, REGRESSION, SINGLE_LABEL

# A label written as a whole number, as JSON or as text ("1", and "1.0" as pandas writes ints beside a gap).
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def label_value(value: Any) -> int | str | float | list | dict:
    """A label as ftcli reads it: an id (int) whether written as a number or as text, a name (str),
    a fractional number (float), or a list or mapping."""
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


def _kind(value: Any) -> str:
    return {int: "id", str: "name", float: "score"}.get(type(value), "many")


def is_missing(value: Any) -> bool:
    """No label: null, or csv's empty field."""
    return value is None or (isinstance(value, str) and not value.strip())


# ---------------------------------------------------------------- does the column fit the task


def check_labels(rows: Rows, data: DataConfig, task: str, where: str) -> None:
    """One clear line when the labels do not fit the task: several per example, scores, names
    under regression, ids and names mixed, values outside data.label_range."""
    if task == MULTI_LABEL:
        _check_multi_label(rows, data, where)
        return
    first_of: dict[str, tuple[int, Any]] = {}
    for number, row in enumerate(rows, start=1):
        first_of.setdefault(_kind(label_value(row[data.label_field])), (number, row[data.label_field]))
    if "many" in first_of:
        number, value = first_of["many"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is a {type(value).__name__}, not one {'class' if task == SINGLE_LABEL else 'number'}",
            "several labels per example: set task: multi_label",
        )
    if task == REGRESSION:
        _check_regression(rows, data, where, first_of)
        return
    if "score" in first_of:
        number, value = first_of["score"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is a number with a fraction: a score, not a class",
            "to predict a score, set task: regression; classes are names or whole-number ids",
        )
    _refuse_mixed(first_of, where)


def _check_regression(rows: Rows, data: DataConfig, where: str, first_of: dict[str, tuple[int, Any]]) -> None:
    if "name" in first_of:
        number, value = first_of["name"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is not a number, and task regression predicts one",
            "give every row a number, or set task: single_label to predict classes",
        )
    if data.label_range is None:
        return
    low, high = data.label_range
    for number, row in enumerate(rows, start=1):
        value = float(label_value(row[data.label_field]))
        if not low <= value <= high:
            raise FtcliError(
                f"{where} row {number}: label {value:g} is outside data.label_range [{low:g}, {high:g}]",
                "fix the label, or widen data.label_range",
            )


def _refuse_mixed(first_of: dict[str, tuple[int, Any]], where: str) -> None:
    if "id" in first_of and "name" in first_of:
        (id_row, an_id), (name_row, a_name) = first_of["id"], first_of["name"]
        raise FtcliError(
            f"{where}: labels mix numbers and names (row {id_row}: {an_id!r}, row {name_row}: {a_name!r})",
            "write every label as a name, or every label as an id 0..N-1 with the names in data.label_names",
        )


def _check_multi_label(rows: Rows, data: DataConfig, where: str) -> None:
    if data.label_fields:
        for number, row in enumerate(rows, start=1):
            for column in data.label_fields:
                if label_value(row.get(column)) not in (0, 1, "true", "false"):
                    raise FtcliError(
                        f"{where} row {number}: column '{column}' holds {row.get(column)!r}",
                        "data.label_fields columns hold 0 or 1 (whether the example has that label)",
                    )
        return
    first_of: dict[str, tuple[int, Any]] = {}
    for number, row in enumerate(rows, start=1):
        for item in split_labels(row[data.label_field], data.label_separator):
            kind = _kind(label_value(item))
            if kind in ("score", "many"):
                raise FtcliError(
                    f"{where} row {number}: label {item!r} in {row[data.label_field]!r} is not a label name or id",
                    "to predict a score, set task: regression; labels are names or whole-number ids",
                )
            first_of.setdefault(kind, (number, item))
    _refuse_mixed(first_of, where)


def split_labels(value: Any, separator: str) -> list[Any]:
    """A multi_label field as its labels: a list as it is, a string split at the separator (as a
    csv or tsv cell holds them), a single id; nothing (null, empty) is no label at all."""
    if is_missing(value):
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [part.strip() for part in value.split(separator) if part.strip()]
    return [value]


# ---------------------------------------------------------------- names and encoding


def resolve_label_names(splits: dict[str, Rows], data: DataConfig, task: str, hub_names: list[str] | None) -> list[str]:
    """data.label_names, else the Hub's ClassLabel names, else the training labels sorted (ids
    numerically, whether they came as numbers or as text). regression: the one output's name."""
    if task == REGRESSION:
        return [data.label_field]
    if data.label_fields:
        return list(data.label_fields)
    if data.label_names:
        return list(data.label_names)
    if hub_names:
        return list(hub_names)
    if task == MULTI_LABEL:
        labels = [label_value(item) for row in splits["train"] for item in split_labels(row[data.label_field], data.label_separator)]
    else:
        labels = [label_value(row[data.label_field]) for row in splits["train"]]
    if all(isinstance(label, int) for label in labels):
        return [str(label) for label in sorted(set(labels))]
    return sorted(set(map(str, labels)))


def encode_labels(rows: Rows, data: DataConfig, task: str, label_names: list[str], where: str) -> list:
    """Each row's label as the model trains on it."""
    if task == REGRESSION:
        return [float(label_value(row[data.label_field])) for row in rows]
    if task == SINGLE_LABEL:
        return [_label_id(row[data.label_field], label_names, where, number) for number, row in enumerate(rows, start=1)]
    encoded = []
    for number, row in enumerate(rows, start=1):
        hot = [0.0] * len(label_names)
        if data.label_fields:
            hot = [1.0 if label_value(row[column]) in (1, "true") else 0.0 for column in data.label_fields]
        else:
            for item in split_labels(row[data.label_field], data.label_separator):
                hot[_label_id(item, label_names, where, number)] = 1.0
        encoded.append(hot)
    return encoded


def _label_id(value: Any, label_names: list[str], where: str, number: int) -> int:
    """Names map by position; ids (as numbers or as text) are positions unless the names
    themselves are numbers, in which case ids map by name."""
    read = label_value(value)
    if str(read) in label_names:
        return label_names.index(str(read))
    if isinstance(read, int) and not _all_numeric(label_names) and 0 <= read < len(label_names):
        return read
    raise FtcliError(
        f"{where} row {number}: label {value!r} is not one of data.label_names {label_names}",
        "fix the label, or list every class in data.label_names",
    )


def _all_numeric(names: list[str]) -> bool:
    return all(_INTEGER.fullmatch(name.strip()) for name in names)
