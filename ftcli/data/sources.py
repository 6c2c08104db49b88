"""Where examples come from: local files (read by ftcli.formats) or the Hub.

A source reads its splits as rows (dicts) and fingerprints itself, so that the tokenization cache
goes stale exactly when the data changes. A new kind of source is a class here with those two
methods, and a branch in ftcli.data.prepare.source_for. A Hub dataset with a local data.unlabeled
file is both: `Joined`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from ftcli import hub
from ftcli.config import UNLABELED
from ftcli.errors import FtcliError
from ftcli.fileio import file_sha256
from ftcli.formats import Rows, read_records, require_file


class Source(Protocol):
    def splits(self) -> tuple[dict[str, Rows], list[str] | None]:
        """Rows by split name, and the label names the source declares (None when it declares none)."""

    def fingerprint(self) -> str:
        """Changes whenever the rows would."""


@dataclass(frozen=True)
class LocalFiles:
    files: dict[str, str]  # split name -> path
    quoting: str = "auto"
    format: str = "auto"  # data.format: conll reads .tsv and .txt files as CoNLL

    def splits(self) -> tuple[dict[str, Rows], list[str] | None]:
        return {split: read_records(path, self.quoting, self.format, tagged=split != UNLABELED) for split, path in self.files.items()}, None

    def fingerprint(self) -> str:
        # Paths are left out: the same bytes under another path are the same data.
        digest = hashlib.sha256((self.quoting + ("" if self.format == "auto" else self.format)).encode())
        for split, path in self.files.items():
            digest.update(split.encode())
            digest.update(file_sha256(require_file(path)).encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class HubDataset:
    name: str
    subset: str | None
    label_field: str

    def splits(self) -> tuple[dict[str, Rows], list[str] | None]:
        return _load_hub(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(["hub", self.name, self.subset]).encode()).hexdigest()


@dataclass(frozen=True)
class Joined:
    """Several sources' splits as one (a Hub dataset and a local data.unlabeled file), a later
    source's split replacing an earlier one of the same name."""

    parts: tuple[Source, ...]

    def splits(self) -> tuple[dict[str, Rows], list[str] | None]:
        rows: dict[str, Rows] = {}
        names = None
        for part in self.parts:
            found, declared = part.splits()
            rows, names = rows | found, names or declared
        return rows, names

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([part.fingerprint() for part in self.parts]).encode()).hexdigest()


# ---------------------------------------------------------------- the Hub


def _load_hub(source: HubDataset) -> tuple[dict[str, Rows], list[str] | None]:
    from datasets import ClassLabel, load_dataset

    offline = hub.offline()
    try:
        loaded = load_dataset(source.name, source.subset)
    except Exception as error:  # network, unknown id, missing subset: all mean "not loadable"
        hint = (
            "the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1) and the dataset is not in the "
            "Hub cache: use local files in data.train/validation/test"
            if offline
            else "check source.name and source.subset"
        )
        raise FtcliError(f"cannot load Hub dataset '{source.name}' ({type(error).__name__})", hint) from None
    splits = {}
    names = None
    for split, dataset in loaded.items():
        feature = dataset.features.get(source.label_field)
        feature = getattr(feature, "feature", feature)  # a list of ClassLabel (multi-label) names its classes too
        if isinstance(feature, ClassLabel):
            names = feature.names
        rows = dataset.to_list()
        if rows and all(row.get(source.label_field) == -1 for row in rows):
            continue  # an unlabeled split (GLUE's test): nothing to train or score on
        splits[split] = rows
    return splits, names


