"""The predict command: label names and class probabilities for rows from a file or the command line."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from ftcli.data.prepare import check_texts, tokenize_rows
from ftcli.formats import read_records
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_text
from ftcli.inference import predict_scores, prediction_fields
from ftcli.modeling import label_names_of
from ftcli.runs.loading import load_run
from ftcli.runtime import Runtime

OUTPUT_SUFFIXES = (".jsonl", ".csv")


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
) -> list[dict[str, Any]]:
    """Every row gets predicted_label, its probability and all class probabilities. precision: the
    run's training.precision unless given (fp32 for probabilities to the last digit)."""
    if (input_file is None) == (text is None):
        raise FtcliError("give either --input FILE or --text", "e.g. ftcli predict RUN --text 'great movie'")
    if output is not None:
        check_output(output)
    loaded = load_run(run_path, checkpoint, adapter)
    config, tokenizer = loaded.config, loaded.tokenizer
    runtime = Runtime.resolve(precision or config.training.precision)
    model = loaded.model.to(runtime.device)
    fields = config.data.text_fields
    rows = read_records(input_file, config.data.quoting) if input_file is not None else inline_rows(fields, text or "", text_pair)
    missing = [column for column in fields if column not in rows[0]]
    if missing:
        raise FtcliError(
            f"input has no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(rows[0])})",
            f"the model reads {', '.join(fields)}",
        )
    check_texts(rows, fields, where="input")
    dataset = tokenize_rows(rows, config.data, tokenizer)
    objective = loaded.objective
    scores = predict_scores(model, dataset, config.training.eval_batch_size, tokenizer.pad_token_id, runtime, objective)
    names = label_names_of(model)
    results = [row | prediction_fields(objective, names, row_scores) for row, row_scores in zip(rows, scores)]
    write_predictions(results, output, config.data.label_separator)
    return results


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
