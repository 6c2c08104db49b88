"""The model a server answers with: a run's tokenizer, objective and label names beside an engine,
and the two translations around a forward pass: texts to token rows, logits to answers.

Token rows are made exactly as `ftcli predict` makes them (data.prepare.tokenize_columns: truncation
to data.max_length, or with long_text: window overlapping windows; a tagger's words as
word_columns makes them), and answers are what `ftcli predict` gives (the task's
row_predictions: a tagger's entities, read off its words), so a server and the command agree.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

import ftcli
from ftcli.config import Config
from ftcli.data.batching import MODEL_COLUMNS
from ftcli.data.prepare import Columns, prefix_spaced, text_columns, word_columns
from ftcli.errors import FtcliError
from ftcli.modeling import label_names_of
from ftcli.objective import Objective
from ftcli.runs.loading import load_run
from ftcli.runtime import Runtime
from ftcli.serving.batcher import Row
from ftcli.onnx_predict import DamagedExport, export_problem
from ftcli.runs.rundir import INT8_FILE, RunDir
from ftcli.serving.engines import ENGINES, Engine, OnnxEngine, TorchEngine, onnx_file_of
from ftcli import tasks

log = logging.getLogger("ftcli")

TEI_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # /info's model_dtype; int8 stays int8

Texts = tuple[str, ...]  # one input: a text, or a sentence pair


class TooLong(Exception):
    """An input longer than data.max_length tokens, where the client asked not to truncate."""

    def __init__(self, index: int, tokens: int) -> None:
        super().__init__(index, tokens)
        self.index, self.tokens = index, tokens


@dataclass
class ServedModel:
    run_name: str
    config: Config
    tokenizer: PreTrainedTokenizerBase
    objective: Objective
    label_names: list[str]
    engine: Engine
    precision: str

    @property
    def text_fields(self) -> list[str]:
        return list(self.config.data.text_fields)

    @property
    def windowed(self) -> bool:
        return self.config.data.long_text == "window"

    @property
    def token_level(self) -> bool:
        """Whether the model tags each word (token_classification) rather than a text."""
        return tasks.get(self.config.task).token_level

    def encode(self, inputs: list[Texts], truncate: bool = True, side: str | None = None) -> list[list[Row]]:
        """Each input's token rows (one, or a windowed input's windows). truncate=False: TooLong
        for the first input longer than data.max_length; side: the end truncation cuts, None the
        tokenizer's own as ftcli predict (windows and a tagger's words read the whole text)."""
        columns = [list(texts) for texts in zip(*inputs)]
        max_length = self.config.data.max_length
        if not truncate and not self.windowed:  # windows read a long text whole
            full = self.tokenizer(*columns, truncation=False)["input_ids"]
            longest = max(range(len(full)), key=lambda index: len(full[index]))
            if len(full[longest]) > max_length:
                raise TooLong(longest, len(full[longest]))
        if self.token_level:  # before windows: a tagger's are of whole words (tokenize_words')
            return self._words(inputs)
        if self.windowed:
            return self._windows(inputs)
        own = self.tokenizer.truncation_side
        # The tokenizer reads truncation_side at every call (it takes no argument for it); each
        # tokenizer thread holds its own copy (app._encoders), so no other request sees the change.
        self.tokenizer.truncation_side = side or own
        try:
            encoded = self.tokenizer(*columns, truncation=True, max_length=max_length)  # as tokenize_rows does
        finally:
            self.tokenizer.truncation_side = own
        names = [name for name in MODEL_COLUMNS if name in encoded]
        return [[{name: encoded[name][index] for name in names}] for index in range(len(inputs))]

    def _windows(self, inputs: list[Texts]) -> list[list[Row]]:
        rows = [dict(zip(self.text_fields, texts)) for texts in inputs]
        columns = Columns(text_columns(rows, self.config.data, self.tokenizer))  # no Dataset per request
        names = [name for name in MODEL_COLUMNS if name in columns.column_names]
        windows: list[list[Row]] = [[] for _ in inputs]
        for window in columns.to_list():
            windows[window["doc"]].append({name: window[name] for name in names})
        return windows

    def _words(self, inputs: list[Texts]) -> list[list[Row]]:
        """Each text's words and their pieces, as ftcli predict tokenizes them (tokenize_words'
        columns); a row keeps its words (word_ids, spans) for row_predictions."""
        columns = word_columns([dict(zip(self.text_fields, texts)) for texts in inputs], self.config.data, self.tokenizer)
        rows: list[list[Row]] = [[] for _ in inputs]
        for index in range(len(columns["input_ids"])):  # a long sentence's windows carry its index (doc)
            row = {name: values[index] for name, values in columns.items()}
            rows[row.get("doc", index)].append(row)
        return rows

    def logits_of(self, row_logits: np.ndarray, rows: list[Row] | None = None) -> torch.Tensor:
        """One input's logits (1, labels), or a tagger's (1, tokens, labels), from its rows': a
        windowed input's put together as ftcli predict puts a document's windows together."""
        logits = torch.from_numpy(np.ascontiguousarray(row_logits))
        if rows and "doc_positions" in rows[0]:  # a tagger's windows: each token from the window that reports it
            width = logits.shape[1]
            positions = torch.tensor([(row["doc_positions"] + [-1] * width)[:width] for row in rows])
            return self.objective.aggregate(logits, torch.zeros(len(logits), dtype=torch.long), 1, positions)
        if self.windowed and not self.token_level:
            return self.objective.aggregate(logits, torch.zeros(len(logits), dtype=torch.long), 1)
        return logits

    def predictions(self, inputs: list[Texts], rows: list[list[Row]], logits: list[np.ndarray]) -> list[dict[str, Any]]:
        """What ftcli predict gives for these inputs, from their rows (encode) and their rows' logits."""
        scores = [self.objective.scores(self.logits_of(input_logits, input_rows)).numpy()[0] for input_logits, input_rows in zip(logits, rows)]
        texts = [dict(zip(self.text_fields, input_texts)) for input_texts in inputs]
        # A windowed text's windows are decided as one; a tagger's are put back into its sentence's words.
        tokenized = [row for input_rows in rows for row in input_rows] if self.token_level else [input_rows[0] for input_rows in rows]
        return tasks.get(self.config.task).row_predictions(self.objective, self.label_names, scores, tokenized, texts, self.config.data)

    def label_scores(self, row_logits: np.ndarray, raw_scores: bool) -> list[dict[str, Any]]:
        """text-embeddings-inference's answer: every label with its score (probability, or the
        logit with raw_scores; regression its value), highest first."""
        logits = self.logits_of(row_logits)
        values = logits[0] if raw_scores else self.objective.scores(logits)[0]
        values = values.reshape(-1).tolist()
        pairs = [{"label": name, "score": float(value)} for name, value in zip(self.label_names, values)]
        return sorted(pairs, key=lambda pair: -pair["score"])

    def tei_info(self, router: dict[str, Any]) -> dict[str, Any]:
        """GET /info as text-embeddings-inference answers it: the model, then the server's settings
        (router: max_concurrent_requests to tokenization_workers, in TEI's order)."""
        return {
            "model_id": self.run_name, "model_sha": None,  # a run's weights have no Hub commit
            "model_dtype": TEI_DTYPES.get(self.precision, self.precision), "served_model_name": self.run_name,
            "model_type": {"classifier": {
                "id2label": {str(index): name for index, name in enumerate(self.label_names)},
                "label2id": {name: index for index, name in enumerate(self.label_names)},
            }},
            **router, "version": ftcli.__version__, "sha": None, "docker_label": None,
        }

    def info(self, batcher_settings: dict[str, Any]) -> dict[str, Any]:
        """GET /v1/info: what is served, how, and with which versions."""
        thresholds = tasks.get(self.config.task).thresholds_of(self.objective, len(self.label_names))
        versions = {"ftcli": ftcli.__version__, "torch": torch.__version__}
        for package in ("transformers", "onnxruntime", "fastapi", "uvicorn"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        return {
            "run": self.run_name, "model": self.engine.file, "task": self.config.task,
            "labels": self.label_names, "thresholds": thresholds,
            "text_fields": self.text_fields, "max_length": self.config.data.max_length,
            "long_text": self.config.data.long_text, "engine": self.engine.name,
            "device": str(self.engine.device), "cuda_graphs": self.engine.cuda_graphs, "precision": self.precision, **batcher_settings, "versions": versions,
        }


def load_served(run_path: str | Path, engine: str = "auto", quantized: bool = False, threads: int = 1) -> ServedModel:
    """The run's model behind the chosen engine, checked before the server starts listening."""
    if engine not in (*ENGINES, "auto"):
        raise FtcliError(f"unknown engine '{engine}'", f"use one of: auto, {', '.join(ENGINES)}")
    if quantized and engine == "torch":
        raise FtcliError("--quantized serves the int8 ONNX export", "add --engine onnx")
    loaded = load_run(run_path)
    names = label_names_of(loaded.model)
    # A tagger's words read as following a space (byte-level BPE), copied once here rather than at
    # every request; its pre-tokenizer cuts a text into the same words as the original's.
    tokenizer = prefix_spaced(loaded.tokenizer) if tasks.get(loaded.config.task).token_level else loaded.tokenizer
    served, precision = _onnx_engine(loaded.run, loaded.config, engine, quantized, threads) if engine != "torch" else (None, "")
    if served is None:
        runtime = Runtime.resolve(loaded.config.training.precision)
        served = TorchEngine(loaded.model, runtime, str(loaded.weights), threads)
        precision = runtime.precision
    log.info("engine: %s, %s%s", served.name, precision, " (auto)" if engine == "auto" else "")
    return ServedModel(
        loaded.run.path.name, loaded.config, tokenizer, loaded.objective, names, served, precision
    )


def _onnx_engine(run: RunDir, config: Config, engine: str, quantized: bool, threads: int) -> tuple[Engine | None, str]:
    """--engine onnx's export, or auto's choice: on a machine without a GPU the ONNX export when it is
    current (its int8 model where the export kept one: its accuracy gate passed), else None (torch,
    as on a GPU, where batched bf16 is fastest, and for a tagger that reads long sentences in
    windows). A damaged export under auto is a warning, then torch."""
    if engine == "auto":
        # A tagger's long sentence is read in windows, which only torch serves.
        windows = tasks.get(config.task).token_level and config.data.long_text == "window"
        if torch.cuda.is_available() or windows or export_problem(run, config) is not None:
            return None, ""
        quantized = quantized or (run.export_dir / INT8_FILE).is_file()
    try:
        return OnnxEngine(onnx_file_of(run, quantized), threads), "int8" if quantized else "fp32"
    except DamagedExport as damage:
        if engine != "auto":
            raise
        log.warning("%s; serving with torch (run `ftcli export %s` again)", damage.message, run.path)
        return None, ""
