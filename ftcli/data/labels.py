"""Labels: what a label column holds, the class names, and each example's class id."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftcli.config import DataConfig
from ftcli.errors import FtcliError

Rows = list[dict[str, Any]]


def resolve_label_names(splits: dict[str, Rows], data: DataConfig, hub_names: list[str] | None) -> list[str]:
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


def check_label_kinds(rows: Rows, label_field: str, where: str) -> None:
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


def encode_labels(rows: Rows, label_field: str, label_names: list[str], where: str) -> list[int]:
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
