"""File formats: one reader per suffix, each turning a file into rows (dicts).

A new file format is one entry in READERS: config validation, `ftcli predict --input`, the CLI
help and the README take their lists from it. Every malformation is an FtcliError naming the
file and the line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

from ftcli.errors import FtcliError

Rows = list[dict[str, Any]]


def read_records(path: str | Path, quoting: str = "auto", format: str = "auto", tagged: bool = True) -> Rows:
    """Rows of a data file as dicts, read by its suffix; every malformation is an FtcliError.
    quoting: how csv and tsv files quote their fields (data.quoting); format: conll reads the
    plain-text files (CONLL_SUFFIXES) as CoNLL (data.format); tagged: False reads a CoNLL file's
    words alone, a line's tag if any ignored (texts without labels: data.unlabeled)."""
    path = require_file(path)
    suffix = path.suffix.lower()
    reader = READERS[".conll"] if format == "conll" and suffix in CONLL_SUFFIXES else READERS.get(suffix)
    if reader is None:
        if suffix in CONLL_SUFFIXES:  # .txt: words and tags only
            raise FtcliError(f"{path}: a {suffix} file is read as CoNLL only", CONLL_HINT)
        raise FtcliError(f"unsupported file type '{path.suffix}' ({path})", f"use {FORMATS}")
    rows = _read_conll(path, tagged=False) if reader is READERS[".conll"] and not tagged else reader(path, quoting)
    if not rows:
        raise FtcliError(f"data file {path} holds no rows", "fill it, or remove it from the config")
    return rows


def check_texts(rows: Rows, text_fields: list[str], where: str) -> None:
    """Every row's text fields are strings: a missing, null or numeric text is an error naming the row."""
    for number, row in enumerate(rows, start=1):
        for column in text_fields:
            value = row.get(column)
            if isinstance(value, list):  # words with a tag each, given to a task of a label per text
                raise FtcliError(
                    f"{where} row {number}: '{column}' is a list, not text",
                    "a tag per word is task: token_classification; a sentence-level task reads one string per text field",
                )
            if not isinstance(value, str):
                problem = "missing or null" if value is None else f"a {type(value).__name__}, not text"
                raise FtcliError(f"{where} row {number}: '{column}' is {problem}", "every text field must be a string")


def check_words(rows: Rows, field: str, where: str) -> None:
    """Every row's words (a tagger's input): a non-empty list of strings, or one text to split."""
    for number, row in enumerate(rows, start=1):
        value = row.get(field)
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(word, str) for word in value)):
            continue
        problem = "missing or null" if value is None else "an empty list" if value == [] else f"a {type(value).__name__}, not words"
        raise FtcliError(
            f"{where} row {number}: '{field}' is {problem}",
            f'give each row its words as a list of strings ({{"{field}": ["John", "lives", "here"]}}) or as one text',
        )


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




def _read_conll(path: Path, tagged: bool = True) -> Rows:
    """CoNLL: a word and its tag per line (the word first, the tag last, apart by a TAB or
    whitespace), a blank line between sentences, -DOCSTART- lines skipped. Each sentence is a row
    {"tokens": [words], "ner_tags": [tags]}; untagged, {"tokens": [words]}, a line's tag optional."""
    rows: Rows = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(file_lines(_read_text(path)), start=1):
        if not line.strip():
            if words:
                rows.append({"tokens": words, "ner_tags": tags})
            words, tags = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        parts = [part.strip() for part in parts if part.strip()]
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2 and tagged:
            raise FtcliError(
                f"{path}: line {number} has a word but no tag ({line.strip()!r})",
                "write each word and its tag on one line, apart by a TAB or a space; a blank line between sentences",
            )
        if any(character.isspace() for character in parts[0]):  # a table's text, read as CoNLL
            raise FtcliError(
                f"{path}: line {number} holds {parts[0][:40]!r} as one word, and CoNLL has one word per line",
                "a table of texts with a label each is for a sentence-level task (e.g. task: single_label, "
                "data.format: auto); for token_classification write one word and its tag per line",
            )
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        rows.append({"tokens": words, "ner_tags": tags})
    return rows if tagged else [{"tokens": row["tokens"]} for row in rows]


def _read_csv(path: Path, quoting: str) -> Rows:
    return _read_delimited(path, ",", quoting)


def _read_tsv(path: Path, quoting: str) -> Rows:
    return _read_delimited(path, "\t", quoting)


READERS: dict[str, Callable[[Path, str], Rows]] = {
    ".jsonl": lambda path, quoting: _read_json(path),
    ".json": lambda path, quoting: _read_json(path),
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".parquet": lambda path, quoting: _read_parquet(path),
    ".conll": lambda path, quoting: _read_conll(path),
}
SUFFIXES = tuple(READERS)
# What data.format: conll reads as CoNLL (a .tsv otherwise is a table with a header; a .txt is CoNLL only).
CONLL_SUFFIXES = (".conll", ".tsv", ".txt")
CONLL_HINT = "set data.format: conll (a word and its tag per line, a blank line between sentences), or give a jsonl file"
# "jsonl, json, csv, tsv or parquet": for messages, help texts and the README.
FORMATS = ", ".join(suffix[1:] for suffix in SUFFIXES[:-1]) + f" or {SUFFIXES[-1][1:]}"
