"""Reading label values, as every task does: what a cell holds (an id, a name, a score, several),
whether it is missing, a multi-label field's parts, and a class's id among the label names.

Ids mean the same whether a file holds them as numbers (jsonl, parquet) or as text (csv, tsv).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftcli.errors import FtcliError

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


def kind(value: Any) -> str:
    """id, name, score (a number with a fraction) or many, of a value label_value read."""
    return {int: "id", str: "name", float: "score"}.get(type(value), "many")


def is_missing(value: Any) -> bool:
    """No label: null, or csv's empty field."""
    return value is None or (isinstance(value, str) and not value.strip())


def first_of_each_kind(rows: list[dict], column: str) -> dict[str, tuple[int, Any]]:
    """The first row (numbered from 1) and value of each kind of label in a column."""
    first_of: dict[str, tuple[int, Any]] = {}
    for number, row in enumerate(rows, start=1):
        first_of.setdefault(kind(label_value(row[column])), (number, row[column]))
    return first_of


def refuse_mixed(first_of: dict[str, tuple[int, Any]], where: str) -> None:
    if "id" in first_of and "name" in first_of:
        (id_row, an_id), (name_row, a_name) = first_of["id"], first_of["name"]
        raise FtcliError(
            f"{where}: labels mix numbers and names (row {id_row}: {an_id!r}, row {name_row}: {a_name!r})",
            "write every label as a name, or every label as an id 0..N-1 with the names in data.label_names",
        )


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


def names_found(labels: list[Any]) -> list[str]:
    """The label names the training labels make: ids sorted numerically (whether they came as
    numbers or as text), else the names sorted."""
    if all(isinstance(label, int) for label in labels):
        return [str(label) for label in sorted(set(labels))]
    return sorted(set(map(str, labels)))


def label_id(value: Any, label_names: list[str], where: str, number: int) -> int:
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


def refuse_many(first_of: dict[str, tuple[int, Any]], where: str, one: str) -> None:
    """Several labels in one example's cell, where the task reads `one` (a class, a number)."""
    if "many" in first_of:
        number, value = first_of["many"]
        raise FtcliError(
            f"{where} row {number}: label {value!r} is a {type(value).__name__}, not one {one}",
            "several labels per example: set task: multi_label",
        )


def check_present(rows: list[dict], columns: list[str], where: str) -> None:
    """A label in every row (csv has no null, but an empty field)."""
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if is_missing(row.get(column)):
                raise FtcliError(f"{where} row {number}: label '{column}' is missing or null", "give every row a label")
