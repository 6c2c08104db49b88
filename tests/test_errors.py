"""Every user mistake: one clear line naming the problem and the fix, exit code 2, no traceback,
and nothing half-written (no run directory, no partial cache)."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import invoke, run_cli, sentiment_rows, write_rows

from ftcli.runs.rundir import RunDir


@dataclass
class Case:
    id: str
    expect: str  # a fragment of the one-line error
    config: dict = field(default_factory=dict)  # merged into the base experiment, one level deep
    files: dict[str, bytes | str] = field(default_factory=dict)  # written under the data folder
    command: str = "train"  # train | prepare | config | evaluate | predict
    args: list[str] = field(default_factory=list)  # extra CLI arguments; {data} and {run} expand
    raw_yaml: str | None = None  # replaces the whole experiment file
    needs_run: bool = False  # train a tiny run first (for evaluate/predict cases)
    config_file: str | None = None  # pass this path instead of the experiment file
    env: dict[str, str] = field(default_factory=dict)  # set while the command runs
    remove: list[str] = field(default_factory=list)  # paths deleted from the trained run's copy
    hold_lock: bool = False  # the copy of the trained run is runs/tiny, locked by this process meanwhile


GOOD_JSONL = "".join(json.dumps(row) + "\n" for row in sentiment_rows(16))


def _tiny_config_json() -> str:
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).to_json_string()


def _evil_pickle() -> bytes:
    """A pytorch_model.bin whose unpickling would call a function (here a harmless print)."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    buffer = io.BytesIO()
    torch.save({"weight": Payload()}, buffer)
    return buffer.getvalue()


def _list_labels_parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": ["y"]}]), buffer)
    return buffer.getvalue()


TINY_CONFIG_JSON = _tiny_config_json()
LIST_LABELS_PARQUET = _list_labels_parquet()
EVIL_PICKLE = _evil_pickle()

CASES = [
    # ---- the YAML file itself
    Case("yaml-syntax", "line 3, column 1", raw_yaml="name: x\ndata:\n\ttrain: a.jsonl\n"),
    Case("yaml-empty", "is empty", raw_yaml=""),
    Case("yaml-not-mapping", "must hold a mapping", raw_yaml="- a\n- b\n"),
    Case("config-missing", "does not exist", command="config", config_file="nope.yaml"),
    # ---- schema: unknown keys, types, ranges
    Case("unknown-top-key", "did you mean 'training'", config={"trainig": {"epochs": 1}}),
    Case("unknown-nested-key", "did you mean 'training.learning_rate'", config={"training": {"learning_rat": 1e-4}}),
    Case("unknown-data-key", "did you mean 'data.label_field'", config={"data": {"label_fild": "y"}}),
    Case("negative-lr", "training.learning_rate=-0.1", config={"training": {"learning_rate": -0.1}}),
    Case("batch-size-zero", "training.batch_size=0", config={"training": {"batch_size": 0}}),
    Case("batch-size-text", "training.batch_size='eight'", config={"training": {"batch_size": "eight"}}),
    Case("no-length", "set training.epochs or training.max_steps", config={"training": {"epochs": None, "max_steps": None}}),
    Case("bad-precision", "training.precision", config={"training": {"precision": "fp8"}}),
    Case("bad-scheduler", "training.scheduler", config={"training": {"scheduler": "linaer"}}),
    Case("eval-every-zero", "neither 'epoch' nor a step count", config={"training": {"eval_every": 0}}),
    Case(
        "save-epoch-eval-steps",
        "must both be 'epoch' or both step counts",
        config={"training": {"eval_every": 4, "save_every": "epoch"}},
    ),
    Case(
        "graphs-without-device-data",
        "compile=cuda_graphs reads its batches from the training set on the GPU",
        config={"training": {"compile": "cuda_graphs", "data_on_device": False}},
    ),
    Case("three-text-fields", "data.text_fields", config={"data": {"text_fields": ["a", "b", "c"]}}),
    Case("class-weights-count", "has 3 weights for 2 labels", config={"training": {"class_weights": [1, 2, 3]}}),
    Case("class-weights-negative", "[1, -1] is neither 'balanced' nor a list of positive weights", config={"training": {"class_weights": [1, -1]}}),
    Case("class-weights-typo", "'balance' is neither 'balanced'", config={"training": {"class_weights": "balance"}}),
    Case("unsafe-name", "name: use letters", config={"name": "../escape"}),
    Case("unknown-metric", "did you mean 'accuracy'", config={"metrics": ["acuracy"]}),
    Case("duplicate-label-names", "label names must be unique", config={"data": {"label_names": ["a", "a"]}}),
    Case("hub-and-files", "not both", config={"data": {"hub": "glue"}}),
    Case("subset-without-hub", "data.subset needs data.hub", config={"data": {"subset": "mrpc"}}),
    Case("override-no-equals", "is not KEY=VALUE", args=["--set", "training.epochs"]),
    Case("override-into-scalar", "is not a section", args=["--set", "model.path=x"]),
    Case("override-bad-value", "training.epochs='many'", args=["--set", "training.epochs=many"]),
    Case("unknown-backend", "backend", args=["--backend", "jax"]),
    Case("loop-under-fsdp", "shards the model with FSDP", env={"ACCELERATE_USE_FSDP": "true"}),
    Case("loop-under-deepspeed", "--backend trainer", env={"ACCELERATE_USE_DEEPSPEED": "true"}),
    # ---- data files
    Case("missing-train-file", "does not exist", config={"data": {"train": "{data}/nope.jsonl"}}),
    Case("unsupported-type", "unsupported file type '.xlsx'", config={"data": {"train": "{data}/train.xlsx"}}),
    Case("txt-without-format", "a .txt file is read as CoNLL only: set data.format: conll", config={"data": {"train": "{data}/train.txt"}}),
    Case("train-is-dir", "is a directory", config={"data": {"train": "{data}/folder.jsonl"}}, files={"folder.jsonl/x": ""}),
    Case("empty-file", "holds no rows", files={"train.jsonl": ""}),
    Case("empty-validation", "holds no rows", files={"validation.jsonl": "\n\n"}),
    Case("invalid-json-line", "line 2 is not valid JSON", files={"train.jsonl": '{"text": "a", "label": 1}\n{oops\n'}),
    Case("json-not-objects", "must hold JSON objects", files={"train.json": "[1, 2, 3]"}, config={"data": {"train": "{data}/train.json"}}),
    Case("non-utf8", "is not UTF-8", files={"train.jsonl": b'{"text": "caf\xe9", "label": 1}\n'}),
    Case(
        "csv-ragged",
        "line 3 has 3 fields but the header has 2",
        files={"train.csv": "text,label\ngood film,positive\nbad, film,negative\n"},
        config={"data": {"train": "{data}/train.csv"}},
    ),
    Case("parquet-damaged", "not a readable parquet", files={"train.parquet": b"PAR1 not really"}, config={"data": {"train": "{data}/train.parquet"}}),
    Case("max-length-beyond-model", "data.max_length=1024 is longer than this model takes (512 tokens)", config={"data": {"max_length": 1024}}),
    Case("missing-text-column", "has no column 'review'", config={"data": {"text_fields": ["review"]}}),
    Case("missing-label-column", "has no column 'sentiment'", config={"data": {"label_field": "sentiment"}}),
    Case("unlabelled-validation", "label it with ftcli predict RUN --input FILE", files={"validation.jsonl": '{"text": "fine"}\n'}),
    Case("null-text", "'text' is missing or null", files={"train.jsonl": GOOD_JSONL + '{"text": null, "label": "positive"}\n'}),
    Case("number-text", "'text' is a int, not text", files={"train.jsonl": GOOD_JSONL + '{"text": 7, "label": "positive"}\n'}),
    Case("null-label", "is missing or null", files={"train.jsonl": GOOD_JSONL + '{"text": "fine", "label": null}\n'}),
    Case("label-not-in-names", "label 'neutral' is not one of", files={"train.jsonl": GOOD_JSONL + '{"text": "ok", "label": "neutral"}\n'}, config={"data": {"label_names": ["negative", "positive"]}}),
    Case("one-class", "only one class", files={"train.jsonl": '{"text": "a", "label": "positive"}\n' * 8}),
    Case("validation-label-unknown", "split 'validation' row 1", files={"validation.jsonl": '{"text": "a", "label": "maybe"}\n'}),
    # ---- models
    Case("model-dir-without-model", "holds no model", config={"model": "{data}"}),
    Case("model-path-is-file", "is not a directory", config={"model": "{data}/train.jsonl"}),
    Case("hub-id-offline", "HF_HUB_OFFLINE", config={"model": "someone/some-model"}),
    Case("hub-dataset-offline", "HF_HUB_OFFLINE", config={"data": {"train": None, "validation": None, "hub": "glue", "subset": "mrpc"}}),
    # ---- run directories
    Case("run-dir-is-file", "is a file", files={"runs/tiny": "not a folder"}, config={"output_dir": "{data}/runs"}),
    Case("evaluate-not-a-run", "not an ftcli run directory", command="evaluate", args=["{data}"]),
    Case("evaluate-missing-run", "does not exist", command="evaluate", args=["{data}/no-such-run"]),
    Case("evaluate-unknown-split", "split 'test' is not in this run's data", command="evaluate", args=["{run}", "--split", "test"], needs_run=True),
    Case("evaluate-missing-checkpoint", "no model in", command="evaluate", args=["{run}", "--checkpoint", "999"], needs_run=True),
    Case("predict-no-model", "no model in", command="predict", args=["{run}", "--text", "hi"], needs_run=True, remove=["model"]),
    Case("predict-missing-columns", "input has no column 'text'", command="predict", args=["{run}", "--input", "{data}/other.jsonl"], files={"other.jsonl": '{"review": "good"}\n'}, needs_run=True),
    Case("predict-pair-given-to-single", "classifies single texts", command="predict", args=["{run}", "--text", "a", "--text-pair", "b"], needs_run=True),
    Case("predict-nothing", "give either --input FILE or --text", command="predict", args=["{run}"], needs_run=True),
    Case("predict-bad-output", "name the output .jsonl or .csv", command="predict", args=["{run}", "--text", "a", "--output", "{data}/out.xlsx"], needs_run=True),
    Case("predict-null-text", "input row 1: 'text' is missing or null", command="predict", args=["{run}", "--input", "{data}/nulls.jsonl"], files={"nulls.jsonl": '{"text": null}\n'}, needs_run=True),
    Case("predict-unknown-engine", "unknown engine 'tensorrt' (use one of: auto, torch, onnx)", command="predict", args=["{run}", "--text", "a", "--engine", "tensorrt"], needs_run=True),
    Case("predict-onnx-without-export", "has no ONNX export", command="predict", args=["{run}", "--text", "a", "--engine", "onnx"], needs_run=True),
    Case("predict-onnx-with-a-checkpoint", "--checkpoint needs --engine torch", command="predict", args=["{run}", "--text", "a", "--engine", "onnx", "--checkpoint", "2"], needs_run=True),
]

# ---------------------------------------------------------------- found trying ftcli as new users would (issue 15)
# and more of the same kind
NEW_CASES = [
    # ---- strict YAML
    Case("yaml-duplicate-key", "key 'name' appears twice in one mapping (lines 1 and 3)", raw_yaml="name: a\ndata: {train: x.jsonl}\nname: b\n"),
    Case("yaml-duplicate-nested-key", "key 'epochs' appears twice in one mapping (lines 4 and 5)", raw_yaml="name: a\ndata: {train: x.jsonl}\ntraining:\n  epochs: 1\n  epochs: 2\n"),
    Case("yaml-code-tag", "could not determine a constructor", raw_yaml="name: !!python/object/apply:os.system ['echo pwned']\n"),
    Case("yaml-unhashable-key", "found unhashable key", raw_yaml="name: a\n? [1, 2]\n: 3\n"),
    Case("yaml-data-not-mapping", "data must be a section of keys, not a list", raw_yaml="name: a\ndata: [train.jsonl]\n"),
    # ---- schema
    Case("label-field-is-a-text-field", "data.label_field 'text' is also one of data.text_fields", config={"data": {"label_field": "text"}}),
    Case("name-too-long", "too long for a folder name", config={"name": "n" * 250}),
    Case("name-too-long-override", "too long for a folder name", args=["--set", "name=" + "x" * 230]),
    Case("bad-quoting", "data.quoting", config={"data": {"quoting": "double"}}),
    Case("no-metrics", "metrics", config={"metrics": []}),
    Case("epochs-zero", "training.epochs=0", config={"training": {"epochs": 0, "max_steps": None}}),
    Case("max-length-one", "data.max_length=1", config={"data": {"max_length": 1}}),
    Case("no-text-fields", "data.text_fields", config={"data": {"text_fields": []}}),
    Case("one-label-name", "data.label_names", config={"data": {"label_names": ["only"]}}),
    Case("warmup-ratio-one", "training.warmup_ratio=1", config={"training": {"warmup_ratio": 1}}),
    Case("eval-batch-size-zero", "training.eval_batch_size=0", config={"training": {"eval_batch_size": 0}}),
    Case("max-train-samples-zero", "data.max_train_samples=0", config={"data": {"max_train_samples": 0}}),
    Case("trust-remote-code-text", "trust_remote_code", config={"trust_remote_code": "sometimes"}),
    Case("resume-and-overwrite", "--resume continues a run, --overwrite replaces it", args=["--resume", "--overwrite"]),
    Case("resume-missing-run", "does not exist", args=["--resume"]),
    # ---- labels of the wrong kind
    Case("float-labels", "label 3.8 is a number with a fraction", files={"train.jsonl": '{"text": "a", "label": 3.8}\n{"text": "b", "label": 1.2}\n'}),
    Case("float-labels-csv", "label '3.8' is a number with a fraction", files={"train.csv": "text,label\na,3.8\nb,1.2\n"}, config={"data": {"train": "{data}/train.csv"}}),
    Case("mixed-labels", "labels mix numbers and names", files={"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": "positive"}\n{"text": "c", "label": 0}\n'}),
    Case("list-labels", "is a list, not one class", files={"train.jsonl": '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["y"]}\n'}),
    Case("list-labels-parquet", "is a list, not one class", files={"lists.parquet": LIST_LABELS_PARQUET}, config={"data": {"train": "{data}/lists.parquet"}}),
    Case("dict-labels", "is a dict, not one class", files={"train.jsonl": '{"text": "a", "label": {"x": 1}}\n{"text": "b", "label": {"y": 1}}\n'}),
    Case("empty-csv-label", "row 2: label 'label' is missing or null", files={"train.csv": "text,label\na,positive\nb,\nc,negative\n"}, config={"data": {"train": "{data}/train.csv"}}),
    Case("id-beyond-label-names", "label 5 is not one of data.label_names", files={"train.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n'}, config={"data": {"label_names": ["no", "yes"]}}),
    Case("validation-labels-other-kind", "split 'validation' row 1: label 'maybe'", files={"train.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n', "validation.jsonl": '{"text": "a", "label": "maybe"}\n'}),
    Case("list-text", "'text' is a list, not text", files={"train.jsonl": GOOD_JSONL + '{"text": ["a", "b"], "label": "positive"}\n'}),
    # ---- files that read wrong
    Case("tsv-quote-joins-lines", "a quote at line 2 opens a field that runs to line 3", files={"train.tsv": 'text\tlabel\n"opens\tpositive\ncloses"\tnegative\nok\tpositive\n'}, config={"data": {"train": "{data}/train.tsv"}}),
    Case("tsv-unquoted-ragged", "line 3 has 3 fields but the header has 2", files={"train.tsv": "text\tlabel\ngood\tpositive\nbad\ttab\tnegative\n"}, config={"data": {"train": "{data}/train.tsv", "quoting": "none"}}),
    Case("csv-header-only", "holds no rows", files={"train.csv": "text,label\n"}, config={"data": {"train": "{data}/train.csv"}}),
    Case("jsonl-array-line", "must hold JSON objects", files={"train.jsonl": '{"text": "a", "label": 1}\n[1, 2]\n'}),
    Case("utf16-file", "is not UTF-8", files={"train.jsonl": '{"text": "a", "label": 1}\n'.encode("utf-16")}),
    # ---- models
    Case("model-without-weights", "holds no weights", config={"model": "{data}/no-weights"}, files={"no-weights/config.json": TINY_CONFIG_JSON}),
    Case("model-pickle-refused", "the safe load refused them", config={"model": "{data}/pickled"}, files={"pickled/config.json": TINY_CONFIG_JSON, "pickled/pytorch_model.bin": EVIL_PICKLE}),
    Case("model-relative-missing", "is not a directory", config={"model": "./no-such-model"}),
    # ---- run directories
    Case("output-dir-below-a-file", "cannot be created: ", files={"plain-file": "x"}, config={"output_dir": "{data}/plain-file/runs"}),
    Case("overwrite-a-run-in-use", "is in use by process", args=["--overwrite"], needs_run=True, hold_lock=True),
    Case("overwrite-not-a-run", "not an ftcli run directory", args=["--overwrite"], files={"runs/tiny/notes.txt": "mine"}, config={"output_dir": "{data}/runs"}),
    # ---- evaluate, predict, report, export
    Case("predict-output-is-a-folder", "outdir.jsonl is a directory (name a file", command="predict", args=["{run}", "--text", "a", "--output", "{data}/outdir.jsonl"], files={"outdir.jsonl/keep": ""}, needs_run=True),
    Case("predict-output-below-a-file", "is a file", command="predict", args=["{run}", "--text", "a", "--output", "{data}/plain/out.jsonl"], files={"plain": "x"}, needs_run=True),
    Case("predict-input-is-a-folder", "is a directory", command="predict", args=["{run}", "--input", "{data}"], needs_run=True),
    Case("predict-input-missing", "does not exist", command="predict", args=["{run}", "--input", "{data}/nope.jsonl"], needs_run=True),
    Case("predict-input-empty", "holds no rows", command="predict", args=["{run}", "--input", "{data}/empty.csv"], files={"empty.csv": "text\n"}, needs_run=True),
    Case("predict-input-joined-lines", "opens a field that runs to line 3", command="predict", args=["{run}", "--input", "{data}/in.csv"], files={"in.csv": 'text\n"opens\ncloses"\n'}, needs_run=True),
    Case("evaluate-adapter-not-lora", "has no adapter/", command="evaluate", args=["{run}", "--adapter"], needs_run=True),
    Case("evaluate-adapter-and-checkpoint", "--adapter and --checkpoint both choose", command="evaluate", args=["{run}", "--adapter", "--checkpoint", "2"], needs_run=True),
    Case("report-not-a-run", "not an ftcli run directory", command="report", args=["{data}"]),
    Case("report-no-events", "has no logged events", command="report", args=["{run}"], needs_run=True, remove=["metrics.jsonl"]),
    Case("export-unknown-format", "unknown export format 'tflite'", command="export", args=["{run}", "--format", "tflite"], needs_run=True),
    Case("push-offline", "HF_HUB_OFFLINE", command="push", args=["{run}", "someone/repo"], needs_run=True, env={"HF_HUB_OFFLINE": "1"}),
]
# ---- when the data or the options contradict the task (task types)
SCORES = '{"text": "a", "label": 3.8}\n{"text": "b", "label": 1.2}\n'
TASK_CASES = [
    Case("scores-under-single-label", "set task: regression", files={"train.jsonl": SCORES}),
    Case("lists-under-single-label", "set task: multi_label", files={"train.jsonl": '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["y"]}\n'}),
    Case("names-under-regression", "row 1: label 'negative' is not a number, and task regression predicts one", config={"task": "regression"}),
    Case("lists-under-regression", "set task: multi_label", config={"task": "regression"}, files={"train.jsonl": '{"text": "a", "label": [1, 2]}\n{"text": "b", "label": [2]}\n'}),
    Case("outside-label-range", "label 3.8 is outside data.label_range [0, 1]", config={"task": "regression", "data": {"label_range": [0, 1]}}, files={"train.jsonl": SCORES}),
    Case("score-in-multi-label", "label 0.5 in [0.5] is not a label name or id", config={"task": "multi_label"}, files={"train.jsonl": '{"text": "a", "label": [0.5]}\n{"text": "b", "label": []}\n'}),
    Case("unknown-multi-label-in-validation", "split 'validation' row 1: label 'surprise' is not one of", config={"task": "multi_label"}, files={"train.jsonl": '{"text": "a", "label": ["joy"]}\n{"text": "b", "label": ["fear"]}\n', "validation.jsonl": '{"text": "c", "label": ["surprise"]}\n'}),
    Case("label-fields-not-zero-one", "column 'toxic' holds 'maybe'", config={"task": "multi_label", "data": {"label_fields": ["toxic", "rude"]}}, files={"train.jsonl": '{"text": "a", "toxic": 1, "rude": 0}\n{"text": "b", "toxic": "maybe", "rude": 1}\n'}),
    Case("label-fields-under-single-label", "data.label_fields (one 0/1 column per label) needs task: multi_label", config={"data": {"label_fields": ["a", "b"]}}),
    Case("label-fields-and-names", "data.label_fields names the labels already", config={"task": "multi_label", "data": {"label_fields": ["a", "b"], "label_names": ["x", "y"]}}),
    Case("pearson-under-single-label", "metric 'pearson' correlates predicted numbers with true ones: under task single_label it would score class ids", config={"metrics": ["accuracy", "pearson"]}),
    Case("accuracy-under-regression", "metric 'accuracy' is for task single_label or token_classification, not regression", config={"task": "regression", "metrics": ["accuracy"]}),
    Case("f1-micro-under-single-label", "metric 'f1_micro' is for task multi_label", config={"metrics": ["f1_micro"]}),
    Case("class-weights-under-regression", "training.class_weights weighs classes; a regression run has none", config={"task": "regression", "training": {"class_weights": "balanced"}}),
    Case("label-names-under-regression", "data.label_names names classes; a regression run predicts one number", config={"task": "regression", "data": {"label_names": ["a", "b"]}}),
    Case("label-range-under-single-label", "data.label_range is for task: regression", config={"data": {"label_range": [0, 5]}}),
    Case("label-range-backwards", "data.label_range [5.0, 0.0] must be [low, high]", config={"task": "regression", "data": {"label_range": [5, 0]}}),
    Case("clip-without-range", "data.clip_predictions needs data.label_range", config={"task": "regression", "data": {"clip_predictions": True}}),
    Case("smoothing-under-multi-label", "training.label_smoothing is for task: single_label, not multi_label", config={"task": "multi_label", "training": {"label_smoothing": 0.1}}),
    Case("huber-under-single-label", "training.loss huber does not train task single_label; use cross_entropy", config={"training": {"loss": "huber"}}),
    Case("threshold-not-a-probability", "1.5 must be 'tuned' or a probability between 0 and 1", config={"task": "multi_label", "thresholds": 1.5}),
    Case("unknown-task", "task: Input should be 'single_label', 'multi_label', 'regression' or 'token_classification'", config={"task": "multiclass"}),
]
CASES += NEW_CASES + TASK_CASES


def _expand(value, data_dir: Path, run_dir: Path):
    if isinstance(value, str):
        return value.replace("{data}", str(data_dir)).replace("{run}", str(run_dir))
    if isinstance(value, dict):
        return {key: _expand(item, data_dir, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, data_dir, run_dir) for item in value]
    return value


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One tiny run (model/ removed for the 'no model' case is done on a copy)."""
    root = tmp_path_factory.mktemp("trained")
    train = write_rows(root / "train.jsonl", sentiment_rows(16))
    experiment = {
        "name": "run",
        "output_dir": str(root / "runs"),
        "model": str(tiny_model_dir),
        "data": {"train": str(train), "validation": str(train), "max_length": 16},
        "training": {"max_steps": 2, "eval_every": 2, "save_every": 2},
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    result = invoke("train", str(root / "experiment.yaml"))
    assert result.exit_code == 0, result.output
    return root / "runs" / "run"


def _prepare_case(case: Case, tmp_path: Path, tiny_model_dir: Path, trained_run: Callable[[], Path]) -> list[str]:
    data_dir = tmp_path / "data"
    write_rows(data_dir / "train.jsonl", sentiment_rows(16, seed=1))
    write_rows(data_dir / "validation.jsonl", sentiment_rows(8, seed=2))
    for name, content in case.files.items():
        target = data_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    run_dir = tmp_path / "no-run"
    if case.needs_run:
        run_dir = tmp_path / "runs" / "tiny" if case.hold_lock else tmp_path / "run"
        shutil.copytree(trained_run(), run_dir)
        for name in case.remove:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    experiment = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "model": str(tiny_model_dir),
        "data": {"train": "{data}/train.jsonl", "validation": "{data}/validation.jsonl", "max_length": 16},
        "training": {"max_steps": 2, "eval_every": 2, "save_every": 2},
    }
    for key, value in case.config.items():
        if isinstance(value, dict):
            experiment[key] = {**experiment.get(key, {}), **value}
        else:
            experiment[key] = value
    experiment["data"] = {key: value for key, value in experiment["data"].items() if value is not None}
    config_path = tmp_path / "experiment.yaml"
    if case.raw_yaml is not None:
        config_path.write_text(case.raw_yaml)
    else:
        config_path.write_text(yaml.safe_dump(_expand(experiment, data_dir, run_dir)))
    args = _expand(case.args, data_dir, run_dir)
    if case.command in ("evaluate", "predict", "report", "export", "push"):
        return [case.command, *args]
    return [case.command, case.config_file or str(config_path), *args]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_user_error_is_one_clear_line(case: Case, tmp_path, tiny_model_dir, trained_run, isolated_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _prepare_case(case, tmp_path, tiny_model_dir, lambda: trained_run)
    cache_before = set(isolated_cache.rglob("*")) if isolated_cache.exists() else set()
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)

    tiny_run = tmp_path / "runs" / "tiny"
    files_before = sorted(tiny_run.rglob("*")) if tiny_run.exists() else None
    with RunDir(tiny_run).lock() if case.hold_lock else nullcontext():
        result = invoke(*argv)

    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: "), message
    assert case.expect in message, message
    assert "Traceback" not in result.output
    assert len(message.splitlines()) <= 2  # one line (a long one may wrap once in narrow terminals)
    if files_before is None:
        assert not tiny_run.exists() or case.id == "run-dir-is-file"
    else:  # a run that was there stays as it was
        assert sorted(tiny_run.rglob("*")) == files_before
    cache_after = set(isolated_cache.rglob("*")) if isolated_cache.exists() else set()
    assert not [p for p in cache_after - cache_before if p.name.startswith(".")], "partial cache left behind"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len(NEW_CASES) >= 40  # found trying ftcli as new users would, and more of the same kind


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {train: a.jsonl}\ntraining: {learning_rat: 1}\n")
    result = run_cli("train", str(bad))
    assert result.returncode == 2
    assert "did you mean 'training.learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
