"""A distilled student's targets: its teacher's logits on every training row and on data.unlabeled's
texts, computed once and cached beside the tokenized splits, keyed by the split and the teacher's
weights, so no epoch and no second run computes them again.

The teacher is a finished run; its model/ carries its calibration (the fitted temperature is folded
into its last layer), so its logits are the calibrated ones. A teacher that tokenizes as the
student does reads the student's own rows (a long text's windows, a tagger's pieces); one with
another tokenizer reads the same documents tokenized its way, and each of the student's rows takes
its document's logits (a tagger's pieces cannot be matched across tokenizers: refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from ftcli import tasks
from ftcli.config import UNLABELED, Config
from ftcli.data.batching import column, with_column
from ftcli.data.prepare import Prepared, prepare, tokenizer_fingerprint
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_bytes, damaged_file
from ftcli.inference import document_logits, row_logits
from ftcli.modeling import label_names_of
from ftcli.runs.loading import LoadedRun, load_run
from ftcli.runs.rundir import RunDir
from ftcli.runtime import Runtime

log = logging.getLogger("ftcli")

def with_teacher(config: Config, prepared: Prepared, tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> Prepared:
    """`prepared` with its training split and its unlabeled texts as one training split, each row
    with its teacher's logits ("teacher") and whether it has a label ("labeled")."""
    rows = training_rows(prepared)
    cache = prepared.cache_dir / f"teacher-{_cache_key(config, prepared, len(rows))}.safetensors"
    logits = _read_cache(cache)
    if logits is None:
        teacher = load_run(config.distill.teacher, device=runtime.device)
        check_teacher(config, teacher, prepared.label_names)
        logits = teacher_logits(config, teacher, rows, tokenizer, runtime)
        _write_cache(cache, logits)
        log.info("teacher %s: logits for %d training rows cached in %s", config.distill.teacher, len(rows), cache)
    splits = {name: split for name, split in prepared.splits.items() if name != UNLABELED}
    splits["train"] = with_column(rows, "teacher", _per_row(logits, rows))
    return replace(prepared, splits=DatasetDict(splits))


def training_rows(prepared: Prepared) -> Dataset:
    """The training split, then the unlabeled texts, with a "labeled" column telling them apart."""
    train = prepared.splits["train"]
    train = with_column(train, "labeled", [True] * len(train))
    if UNLABELED not in prepared.splits:
        return train
    unlabeled = prepared.splits[UNLABELED]
    unlabeled = with_column(unlabeled, "labeled", [False] * len(unlabeled))
    # A tagger's split has windows' columns only where one of its sentences is too long; training
    # reads no window's place (each window trains on its own pieces), so the rows keep what both have.
    shared = [column for column in train.column_names if column in unlabeled.column_names]
    return concatenate_datasets([train.select_columns(shared), unlabeled.select_columns(shared)])


def check_teacher(config: Config, teacher: LoadedRun, label_names: list[str]) -> None:
    """The teacher answers the student's question: the same task over the same labels."""
    where = f"the teacher {teacher.run.path}"
    if teacher.config.task != config.task:
        raise FtcliError(f"{where} was trained for {teacher.config.task}, the student for {config.task}", "distill from a run of the same task")
    if tasks.get(config.task).has_classes and label_names_of(teacher.model) != label_names:
        raise FtcliError(
            f"{where} predicts {', '.join(label_names_of(teacher.model))}; the student's data has {', '.join(label_names)}",
            "give the student the teacher's data (ftcli distill copies its config), or the same data.label_names",
        )


def teacher_logits(
    config: Config, teacher: LoadedRun, rows: Dataset, tokenizer: PreTrainedTokenizerBase, runtime: Runtime
) -> torch.Tensor:
    """The teacher's fp32 logits for each row: (rows, labels), or a tagger's (rows, tokens, tags)."""
    batch, pad = config.training.eval_batch_size, teacher.tokenizer.pad_token_id
    if tokenizer_fingerprint(teacher.tokenizer) == tokenizer_fingerprint(tokenizer):
        return row_logits(teacher.model, rows, batch, pad, runtime)
    if tasks.get(config.task).token_level:
        raise FtcliError(
            f"the teacher {teacher.run.path} cuts words into other pieces than the student's tokenizer does",
            "distill a tagger into a student of the same tokenizer (e.g. --student layers:K)",
        )
    # The student's documents, tokenized the teacher's way (a cache hit after the first run).
    theirs = prepare(config.data, teacher.tokenizer, config.task)
    parts = [
        document_logits(teacher.model, theirs.splits[split], batch, pad, runtime, teacher.objective)
        for split in ("train", UNLABELED) if split in theirs.splits
    ]
    documents = torch.tensor(column(rows, "doc")) if "doc" in rows.column_names else torch.arange(len(rows))
    if len(parts) == 2:  # the unlabeled texts' documents are numbered after the training split's
        documents = documents + torch.tensor([0 if labeled else len(parts[0]) for labeled in column(rows, "labeled")])
    return torch.cat(parts)[documents]


def _per_row(logits: torch.Tensor, rows: Dataset) -> list:
    """Logits as a column: a row's, or a tagger's row of a row per token, cut to its length."""
    if logits.dim() == 2:
        return logits.tolist()
    return [values[:length].tolist() for values, length in zip(logits, column(rows, "length"))]


def _cache_key(config: Config, prepared: Prepared, rows: int) -> str:
    """The split (its tokens, a fold of it) and the teacher's weights (their file's size and time)."""
    teacher = RunDir(config.distill.teacher)
    stamp = teacher.weights_stamp()
    if stamp is None:
        raise FtcliError(f"the teacher {teacher.path} has no trained model in model/", f"train it to the end first: ftcli train {teacher.path} --resume")
    fold = config.data.fold.model_dump() if config.data.fold else None
    key = json.dumps([prepared.fingerprint, fold, rows, str(teacher.path.resolve()), stamp])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        with damaged_file(path, "delete it: the teacher's logits are computed again"):
            return load_file(path)["logits"]
    except FtcliError:
        log.warning("the teacher's cached logits %s are damaged; computing them again", path)
        return None


def _write_cache(path: Path, logits: torch.Tensor) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"logits": logits.contiguous()}))
