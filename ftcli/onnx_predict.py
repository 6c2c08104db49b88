"""Prediction with a run's ONNX export, without torch or transformers: onnxruntime computes the
logits, the `tokenizers` library tokenizes as transformers does for the torch path
(data.prepare.tokenize_rows; a tagger's text cut into words by data.words, as tokenize_words
cuts it), and the run's task decides in numpy (ftcli.tasks: its row_predictions), so both engines
give the same fields.
A `ftcli predict` process on this path imports numpy, onnxruntime and tokenizers: MiniLM predicts
a pair in 0.8 s on two cores, where importing torch and transformers' modeling code takes 6.

An export is used only while it is current: report.json records the size and modification time
of the weights it was exported from (`ftcli export`), and model/'s must still be those. Runs with
data.long_text: window keep the torch path: the objective puts a document's windows together,
and this path only truncates.

An export is used only while it is whole: report.json also records each of its files' size, sha256
and the sha256 of its first and last MiB (file_stamps), and a file that differs, or that
onnxruntime or tokenizers cannot read, is a DamagedExport (a copy cut short, a disk's damage).
The server checks a model's whole sha256 once at start; predict, whose point is starting in under
a second, checks sizes and ends: the whole sha256 of MiniLM's 92 MB graph costs 0.07 s of hashing
alone on an idle core and 0.15-0.2 s with the read on two busy ones, the ends 2-9 ms.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.data.padding import length_sorted_batches, pad_array
from ftcli.data.words import prefix_spaced_backend, words_of
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.fileio import file_sha256
from ftcli.formats import Rows
from ftcli.runs.rundir import EXPORT_REPORT_FILE, ONNX_FILE, RunDir
from ftcli.runs.thresholds import decider_for
from ftcli import tasks
from ftcli.tasks import Decider

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

    from ftcli.config import Config

TOKENIZER_FILE = "tokenizer.json"  # as save_pretrained writes a fast tokenizer
# Each input an exported graph may declare, and the field of a tokenizers Encoding that feeds it.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
ENDS_BYTES = 2**20  # ends_sha256 hashes this much of a file's start and of its end


class DamagedExport(FtcliError):
    """A file of a run's export that is not as ftcli export wrote it, or that cannot be read: predict
    --engine auto predicts with torch instead, --engine onnx and the server refuse it."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why
        self.run = path.parent.parent  # an export's files lie in RUN/export/
        super().__init__(f"{path} is damaged ({why})", f"run `ftcli export {self.run}` again, or use --engine torch")


class NeedsWindows(FtcliError):
    """A sentence longer than data.max_length for a tagger whose run reads it in windows, which only
    the torch engine cuts: predict --engine auto predicts with torch instead."""

    def __init__(self, sentence: int, max_length: int) -> None:
        super().__init__(
            f"input row {sentence + 1} is longer than data.max_length={max_length} tokens, and the ONNX path reads no windows",
            "predict with --engine torch (or auto), which tags every word",
        )


@dataclass
class OnnxExport:
    session: Any  # onnxruntime.InferenceSession
    tokenizer: Tokenizer
    pad_token_id: int
    label_names: list[str]
    decider: Decider


def export_problem(run: RunDir, config: Config) -> FtcliError | None:
    """Why the run's ONNX export cannot predict for it, as the error (with its fix) that
    --engine onnx gives; None when it can."""
    command = f"ftcli export {run.path}"
    if "export" in tasks.get(config.task).not_yet:
        return FtcliError(f"task {config.task} has no ONNX path yet", "predict with --engine torch")
    if config.data.long_text == "window" and not tasks.get(config.task).token_level:  # a tagger's: NeedsWindows, per row
        return FtcliError(
            "the ONNX path truncates texts, and this run splits them into windows (data.long_text: window)",
            "predict with --engine torch",
        )
    export = run.export_dir
    if not (export / ONNX_FILE).is_file() or not (export / TOKENIZER_FILE).is_file():
        return FtcliError(f"{run.path} has no ONNX export ({export / ONNX_FILE})", f"run `{command}` first, or use --engine torch")
    stale = stale_export(run)
    if stale is not None:
        return stale
    try:  # tokenizers comes with transformers, a dependency: onnxruntime is the optional one
        require("onnxruntime", "export", "ftcli predict --engine onnx")
    except FtcliError as error:
        return error
    return None


def stale_export(run: RunDir) -> FtcliError | None:
    """The error when the run's export is not of model/'s current weights (or says not of which)."""
    recorded = _read_json(run.export_dir / EXPORT_REPORT_FILE).get("weights")
    if recorded is not None and recorded == run.weights_stamp():
        return None
    why = "records no weights it was exported from" if recorded is None else "is stale: model/ changed after it was exported"
    return FtcliError(f"the ONNX export in {run.export_dir} {why}", f"re-export with `ftcli export {run.path}`, or use --engine torch")


def file_stamps(folder: Path) -> dict[str, dict[str, Any]]:
    """What an export's report records of each of its files (the report aside): its size, sha256
    and ends_sha256, which predict and the server compare before they use it."""
    paths = [path for path in sorted(folder.iterdir()) if path.is_file() and path.name != EXPORT_REPORT_FILE]
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path), "ends_sha256": ends_sha256(path)}
        for path in paths
    }


def ends_sha256(path: Path) -> str:
    """sha256 of a file's first and last ENDS_BYTES (of all of it when shorter than twice that):
    what a cut or an overwrite changes, at the cost of reading two MiB."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(ENDS_BYTES))
        handle.seek(max(ENDS_BYTES, handle.seek(0, os.SEEK_END) - ENDS_BYTES))
        digest.update(handle.read())
    return digest.hexdigest()


def check_export_files(run: RunDir, model_file: str, whole: bool, others: bool) -> None:
    """DamagedExport for the first file whose size or digest is not what report.json records: the
    model file, its external data and, with others, the files beside it (tokenizer, config,
    thresholds); whole: its sha256, else its ends_sha256. An export of an ftcli that recorded none
    goes unchecked (a file onnxruntime or tokenizers cannot read is still found when loaded)."""
    recorded = _read_json(run.export_dir / EXPORT_REPORT_FILE).get("files") or {}
    for name, stamp in recorded.items():
        ours = name == model_file or name.startswith(model_file + ".")  # model.onnx.data with model.onnx
        if not ours and (not others or ".onnx" in name):  # never the other model (fp32 or int8)
            continue
        path = run.export_dir / name
        if not path.is_file():
            raise DamagedExport(path, "missing")
        size = path.stat().st_size
        if size != stamp["bytes"]:
            raise DamagedExport(path, f"{size} bytes where ftcli export wrote {stamp['bytes']}")
        digest, key = (file_sha256(path), "sha256") if whole else (ends_sha256(path), "ends_sha256")
        if digest != stamp[key]:
            raise DamagedExport(path, f"its {key} is not the one ftcli export recorded")


def load_export(run: RunDir, config: Config) -> OnnxExport:
    """The export's session, tokenizer, label names and decisions (its thresholds.json), each file
    checked first (check_export_files)."""
    export = run.export_dir
    check_export_files(run, ONNX_FILE, whole=False, others=True)
    session = open_session(export / ONNX_FILE, _cores())
    tokenizer, pad_token_id = load_tokenizer(export, config.data.max_length)
    id2label = _read_json(export / "config.json")["id2label"]
    names = [id2label[key] for key in sorted(id2label, key=int)]
    return OnnxExport(session, tokenizer, pad_token_id, names, decider_for(config, export))


def open_session(onnx_file: Path, threads: int, cuda: bool = False) -> Any:
    """An onnxruntime session on `threads` threads, on CUDA first when asked and onnxruntime has it
    (onnxruntime-gpu), else the CPU. Both users, predict and the server, run one batch at a time.
    A file onnxruntime cannot parse or check is a DamagedExport."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    available = onnxruntime.get_available_providers()
    providers = ["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in available else []
    try:
        return onnxruntime.InferenceSession(str(onnx_file), options, providers=providers + ["CPUExecutionProvider"])
    except (InvalidProtobuf, InvalidGraph, Fail) as error:
        raise DamagedExport(onnx_file, f"onnxruntime cannot load it: {_first_line(error)}") from None


def load_tokenizer(folder: Path, max_length: int) -> tuple[Tokenizer, int]:
    """A saved tokenizer set up as tokenize_rows calls transformers' (truncation=True,
    max_length, no padding), and its pad token's id."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise DamagedExport(folder / TOKENIZER_FILE, f"tokenizers cannot read it: {_first_line(error)}") from None
    settings = _read_json(folder / "tokenizer_config.json")
    # tokenizer.json keeps the padding and truncation of transformers' last call: set ftcli's own.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="longest_first", direction=settings.get("truncation_side", "right"))
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad  # an AddedToken, as some versions save it
    pad_token_id = tokenizer.token_to_id(pad) if pad is not None else None
    # Without a pad token any id serves: padding is masked, and the logits do not depend on it.
    return tokenizer, 0 if pad_token_id is None else pad_token_id


def encode(tokenizer: Tokenizer, rows: Rows, text_fields: list[str]) -> list[Encoding]:
    """Each row's tokens, special tokens added, pairs as pairs."""
    columns = [[row[field] for row in rows] for field in text_fields]
    return tokenizer.encode_batch(list(zip(*columns)) if len(columns) == 2 else columns[0])


def encode_words(tokenizer: Tokenizer, rows: Rows, text_field: str) -> tuple[list[Encoding], list[dict[str, Any]]]:
    """token_classification: each row's words tokenized as pre-split words, as
    data.prepare.tokenize_words does with transformers, and what the task's row_predictions reads
    of each: its pieces' words (word_ids) and, for a text, its words' characters (spans)."""
    words, spans = words_of([row[text_field] for row in rows], tokenizer)
    encodings = (prefix_spaced_backend(tokenizer) or tokenizer).encode_batch(words, is_pretokenized=True)
    return encodings, [{"word_ids": encoding.word_ids, "spans": found} for encoding, found in zip(encodings, spans)]


def predict_with_export(run: RunDir, config: Config, rows: Rows) -> list[dict[str, Any]]:
    """Each row's prediction fields (the task's row_predictions, as the torch path gives them), in
    the rows' order."""
    export = load_export(run, config)
    task = tasks.get(config.task)
    if task.token_level:
        encodings, tokenized = encode_words(export.tokenizer, rows, config.data.text_fields[0])
        cut = [index for index, encoding in enumerate(encodings) if encoding.overflowing]
        if cut and config.data.long_text == "window":
            raise NeedsWindows(cut[0], config.data.max_length)
    else:
        encodings = tokenized = encode(export.tokenizer, rows, config.data.text_fields)
    logits = _logits(export, encodings, config.training.eval_batch_size)
    scores = export.decider.scores(logits)
    return task.row_predictions(export.decider, export.label_names, scores, tokenized, rows, config.data)


def _logits(export: OnnxExport, encodings: list[Encoding], batch_size: int) -> np.ndarray:
    """fp32 logits of every encoding, in their order: batches sorted by length, each padded to its
    longest row, as the torch path batches. A graph with logits per token gives (rows, the longest
    row's tokens, labels), each row's after its last token zeros (inference.logits_store's shape)."""
    inputs = [node.name for node in export.session.get_inputs()]
    per_token = len(export.session.get_outputs()[0].shape) == 3
    width = [max((len(encoding.ids) for encoding in encodings), default=0)] if per_token else []
    logits = np.zeros((len(encodings), *width, len(export.label_names)), dtype=np.float32)
    for indices in length_sorted_batches([len(encoding.ids) for encoding in encodings], batch_size):
        batch = [encodings[index] for index in indices]
        longest = max(len(encoding.ids) for encoding in batch)
        feed = {
            name: pad_array([getattr(encoding, ENCODING_FIELDS[name]) for encoding in batch], longest, export.pad_token_id if name == "input_ids" else 0)
            for name in inputs
        }
        logits[(indices, slice(0, longest)) if per_token else indices] = export.session.run(["logits"], feed)[0]
    return logits


def _cores() -> int:
    """The cores this process may run on: one process computes one batch at a time, so its
    threads take every core (onnxruntime by itself would take only the physical ones)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the export ({} when absent); one that does not parse is a DamagedExport."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise DamagedExport(path, f"not JSON: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
