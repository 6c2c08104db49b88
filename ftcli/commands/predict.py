"""The predict command: label names and class probabilities for rows from a file or the command line.

Two engines compute them: the run's ONNX export on onnxruntime (onnx_predict: no torch, so a
process starts in a fraction of the time) and PyTorch on model/, a checkpoint or the adapter, in
any precision. auto takes the export when it is current and nothing asks for torch (--checkpoint,
--adapter, a precision other than fp32), and falls back to torch with a warning when the export is
damaged (onnx_predict.DamagedExport). Both give the same fields (the task's row_predictions).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from ftcli.config import Config, load_config
from ftcli import tasks
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_text
from ftcli.formats import Rows, check_texts, check_words, read_records
from ftcli.onnx_predict import DamagedExport, NeedsWindows, export_problem, predict_with_export
from ftcli.runs.rundir import RunDir

OUTPUT_SUFFIXES = (".jsonl", ".csv")
ENGINES = ("auto", "torch", "onnx")


def _flat(row: dict[str, Any], separator: str) -> dict[str, Any]:
    flat = {key: value for key, value in row.items() if key != "probabilities"}
    if "predicted_labels" in row:
        flat["predicted_labels"] = separator.join(row["predicted_labels"])
    return flat | {f"prob_{name}": p for name, p in row.get("probabilities", {}).items()}


def inline_rows(text_fields: list[str], text: str, text_pair: str | None) -> list[dict[str, Any]]:
    """One row from --text / --text-pair, named after the run's text columns."""
    if len(text_fields) == 2 and text_pair is None:
        raise FtcliError(
            f"this model classifies sentence pairs ({text_fields[0]}, {text_fields[1]})", "add --text-pair"
        )
    if len(text_fields) == 1 and text_pair is not None:
        raise FtcliError("this model classifies single texts", "drop --text-pair")
    return [dict(zip(text_fields, [text, text_pair] if text_pair is not None else [text]))]


def predict(
    run_path: str | Path,
    input_file: Path | None = None,
    text: str | None = None,
    text_pair: str | None = None,
    checkpoint: str | None = None,
    output: Path | None = None,
    adapter: bool = False,
    precision: str | None = None,
    engine: str = "auto",
) -> list[dict[str, Any]]:
    """Every row gets predicted_label, its probability and all class probabilities. precision: the
    run's training.precision unless given (fp32 for probabilities to the last digit); engine:
    auto, torch or onnx (above)."""
    if (input_file is None) == (text is None):
        raise FtcliError("give either --input FILE or --text", "e.g. ftcli predict RUN --text 'great movie'")
    if engine not in ENGINES:
        raise FtcliError(f"unknown engine '{engine}'", f"use one of: {', '.join(ENGINES)}")
    if output is not None:
        check_output(output)
    run = RunDir.open(run_path)
    config = load_config(run.config_file)
    rows = input_rows(config, input_file, text, text_pair)
    fields = _predict_with_engine(run, config, rows, engine, checkpoint, adapter, precision)
    results = [row | row_fields for row, row_fields in zip(rows, fields)]
    write_predictions(results, output, config.data.label_separator)
    return results


def _predict_with_engine(
    run: RunDir, config: Config, rows: Rows, engine: str, checkpoint: str | None, adapter: bool, precision: str | None
) -> list[dict[str, Any]]:
    """Each row's prediction fields from the engine chosen; auto's damaged export: torch's, and a
    warning; auto's tagger with a sentence to read in windows: torch's."""
    try:
        if uses_export(run, config, engine, checkpoint, adapter, precision):
            return predict_with_export(run, config, rows)
    except NeedsWindows:
        if engine != "auto":
            raise
    except DamagedExport as damage:
        if engine != "auto":
            raise
        # One line: the predictions on stdout stay what torch gives, as if no export were there.
        sys.stderr.write(f"warning: {damage.message}; predicting with torch (run `ftcli export {damage.run}` again)\n")
    return _predict_with_torch(run, rows, checkpoint, adapter, precision)


def input_rows(config: Config, input_file: Path | None, text: str | None, text_pair: str | None) -> Rows:
    """The rows to predict, from --input or --text, each with the run's text columns as strings
    (a tagger's: a list of words, or a text its tokenizer splits)."""
    fields, data = config.data.text_fields, config.data
    rows = read_records(input_file, data.quoting, data.format) if input_file is not None else inline_rows(fields, text or "", text_pair)
    missing = [column for column in fields if column not in rows[0]]
    if missing:
        raise FtcliError(
            f"input has no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(rows[0])})",
            f"the model reads {', '.join(fields)}",
        )
    if tasks.get(config.task).token_level:
        check_words(rows, fields[0], where="input")
    else:
        check_texts(rows, fields, where="input")
    return rows


def uses_export(
    run: RunDir, config: Config, engine: str, checkpoint: str | None, adapter: bool, precision: str | None
) -> bool:
    """Whether the ONNX export predicts: with engine onnx it must (else an error that says why not),
    with auto when it is current and no option asks for what only torch computes."""
    if engine == "torch":
        return False
    needs_torch = _torch_only_option(checkpoint, adapter, precision)
    if engine == "auto":
        return needs_torch is None and export_problem(run, config) is None
    if needs_torch is not None:
        raise FtcliError(f"{needs_torch} needs --engine torch: the ONNX export is model/ in fp32", "drop it, or use --engine torch")
    problem = export_problem(run, config)
    if problem is not None:
        raise problem
    return True


def _torch_only_option(checkpoint: str | None, adapter: bool, precision: str | None) -> str | None:
    """The option given that only the torch engine computes (the export is model/'s weights in fp32)."""
    if checkpoint is not None:
        return "--checkpoint"
    if adapter:
        return "--adapter"
    return f"--precision {precision}" if precision not in (None, "fp32") else None


def _predict_with_torch(
    run: RunDir, rows: Rows, checkpoint: str | None, adapter: bool, precision: str | None
) -> list[dict[str, Any]]:
    """Each row's prediction fields from the PyTorch model, in the rows' order."""
    # Imported here: torch and transformers take seconds to import, and the ONNX path uses neither.
    from ftcli.data.prepare import tokenize_columns
    from ftcli.inference import predict_scores
    from ftcli.modeling import label_names_of
    from ftcli.runs.loading import load_run
    from ftcli.runtime import Runtime

    loaded = load_run(run.path, checkpoint, adapter)
    config, tokenizer, objective = loaded.config, loaded.tokenizer, loaded.objective
    runtime = Runtime.resolve(precision or config.training.precision)
    model = loaded.model.to(runtime.device)
    dataset = tokenize_columns(config.task, rows, config.data, tokenizer)
    scores = predict_scores(model, dataset, config.training.eval_batch_size, tokenizer.pad_token_id, runtime, objective)
    return tasks.get(config.task).row_predictions(objective, label_names_of(model), scores, dataset, rows, config.data)


def check_output(output: Path) -> None:
    """Before any work: the output must be a .jsonl or .csv file that can be written."""
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise FtcliError(f"unsupported output type '{output.suffix}'", "name the output .jsonl or .csv")
    if output.is_dir():
        raise FtcliError(f"--output {output} is a directory", f"name a file, e.g. {output / 'predictions.jsonl'}")
    blocker = next((parent for parent in output.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FtcliError(f"--output {output} cannot be written: {blocker} is a file", "name a file in a folder")


def write_predictions(rows: list[dict[str, Any]], output: Path | None, separator: str = ",") -> None:
    """jsonl or csv by the output's extension (csv flattens probabilities to prob_<label> columns and
    joins predicted_labels with the separator); stdout: jsonl."""
    if output is not None and output.suffix.lower() == ".csv":
        flat = [_flat(row, separator) for row in rows]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
        atomic_write_text(output, buffer.getvalue())
        return
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
