"""Prediction with a run's ONNX export, without torch or transformers: onnxruntime computes the
logits, the `tokenizers` library tokenizes as transformers does for the torch path
(data.prepare.tokenize_rows), and decisions.py decides, so both engines give the same fields.
A `ftcli predict` process on this path imports numpy, onnxruntime and tokenizers: MiniLM predicts
a pair in 0.8 s on two cores, where importing torch and transformers' modeling code takes 6.

An export is used only while it is current: report.json records the size and modification time
of the weights it was exported from (`ftcli export`), and model/'s must still be those. Runs with
data.long_text: window keep the torch path: the objective puts a document's windows together,
and this path only truncates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.data.padding import length_sorted_batches, pad_array
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.formats import Rows
from ftcli.runs.rundir import EXPORT_REPORT_FILE, ONNX_FILE, RunDir
from ftcli.runs.thresholds import decider_for
from ftcli.tasks import Decider, prediction_fields

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

    from ftcli.config import Config

TOKENIZER_FILE = "tokenizer.json"  # as save_pretrained writes a fast tokenizer
# Each input an exported graph may declare, and the field of a tokenizers Encoding that feeds it.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


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
    if config.data.long_text == "window":
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


def load_export(run: RunDir, config: Config) -> OnnxExport:
    """The export's session, tokenizer, label names and decisions (its thresholds.json)."""
    export = run.export_dir
    session = open_session(export / ONNX_FILE, _cores())
    tokenizer, pad_token_id = load_tokenizer(export, config.data.max_length)
    id2label = json.loads((export / "config.json").read_text())["id2label"]
    names = [id2label[key] for key in sorted(id2label, key=int)]
    return OnnxExport(session, tokenizer, pad_token_id, names, decider_for(config, export))


def open_session(onnx_file: Path, threads: int, cuda: bool = False) -> Any:
    """An onnxruntime session on `threads` threads, on CUDA first when asked and onnxruntime has it
    (onnxruntime-gpu), else the CPU. Both users, predict and the server, run one batch at a time."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    available = onnxruntime.get_available_providers()
    providers = ["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in available else []
    return onnxruntime.InferenceSession(str(onnx_file), options, providers=providers + ["CPUExecutionProvider"])


def load_tokenizer(folder: Path, max_length: int) -> tuple[Tokenizer, int]:
    """A saved tokenizer set up as tokenize_rows calls transformers' (truncation=True,
    max_length, no padding), and its pad token's id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
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


def predict_with_export(run: RunDir, config: Config, rows: Rows) -> list[dict[str, Any]]:
    """Each row's prediction fields (decisions.prediction_fields), in the rows' order."""
    export = load_export(run, config)
    encodings = encode(export.tokenizer, rows, config.data.text_fields)
    logits = _logits(export, encodings, config.training.eval_batch_size)
    scores = export.decider.scores(logits)
    return [prediction_fields(export.decider, export.label_names, row_scores) for row_scores in scores]


def _logits(export: OnnxExport, encodings: list[Encoding], batch_size: int) -> np.ndarray:
    """fp32 logits of every encoding, in their order: batches sorted by length, each padded to its
    longest row, as the torch path batches."""
    inputs = [node.name for node in export.session.get_inputs()]
    logits = np.zeros((len(encodings), len(export.label_names)), dtype=np.float32)
    for indices in length_sorted_batches([len(encoding.ids) for encoding in encodings], batch_size):
        batch = [encodings[index] for index in indices]
        longest = max(len(encoding.ids) for encoding in batch)
        feed = {
            name: pad_array([getattr(encoding, ENCODING_FIELDS[name]) for encoding in batch], longest, export.pad_token_id if name == "input_ids" else 0)
            for name in inputs
        }
        logits[indices] = export.session.run(["logits"], feed)[0]
    return logits


def _cores() -> int:
    """The cores this process may run on: one process computes one batch at a time, so its
    threads take every core (onnxruntime by itself would take only the physical ones)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
