"""Every user mistake: one clear line naming the problem and the fix, exit code 2, no traceback,
and nothing half-written (no run directory, no partial cache)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import invoke, run_cli, sentiment_rows, write_rows


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


GOOD_JSONL = "".join(json.dumps(row) + "\n" for row in sentiment_rows(16))

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
        "save-not-multiple",
        "multiple of eval_every",
        config={"training": {"eval_every": 4, "save_every": 6}},
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
    Case("unsupported-type", "unsupported file type '.txt'", config={"data": {"train": "{data}/train.txt"}}),
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
    Case("predict-no-model", "no model in", command="predict", args=["{run}", "--text", "hi"], needs_run=True),
    Case("predict-missing-columns", "input has no column 'text'", command="predict", args=["{run}", "--input", "{data}/other.jsonl"], files={"other.jsonl": '{"review": "good"}\n'}, needs_run=True),
    Case("predict-pair-given-to-single", "classifies single texts", command="predict", args=["{run}", "--text", "a", "--text-pair", "b"], needs_run=True),
    Case("predict-nothing", "give either --input FILE or --text", command="predict", args=["{run}"], needs_run=True),
    Case("predict-bad-output", "name the output .jsonl or .csv", command="predict", args=["{run}", "--text", "a", "--output", "{data}/out.xlsx"], needs_run=True),
    Case("predict-null-text", "input row 1: 'text' is missing or null", command="predict", args=["{run}", "--input", "{data}/nulls.jsonl"], files={"nulls.jsonl": '{"text": null}\n'}, needs_run=True),
]


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
        import shutil

        run_dir = tmp_path / "run"
        shutil.copytree(trained_run(), run_dir)
        if case.id == "predict-no-model":
            shutil.rmtree(run_dir / "model")
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
    if case.command in ("evaluate", "predict"):
        return [case.command, *args]
    return [case.command, case.config_file or str(config_path), *args]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_user_error_is_one_clear_line(case: Case, tmp_path, tiny_model_dir, trained_run, isolated_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _prepare_case(case, tmp_path, tiny_model_dir, lambda: trained_run)
    cache_before = set(isolated_cache.rglob("*")) if isolated_cache.exists() else set()
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)

    result = invoke(*argv)

    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: "), message
    assert case.expect in message, message
    assert "Traceback" not in result.output
    assert len(message.splitlines()) <= 2  # one line (a long one may wrap once in narrow terminals)
    assert not (tmp_path / "runs" / "tiny").exists() or case.id == "run-dir-is-file"
    cache_after = set(isolated_cache.rglob("*")) if isolated_cache.exists() else set()
    assert not [p for p in cache_after - cache_before if p.name.startswith(".")], "partial cache left behind"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {train: a.jsonl}\ntraining: {learning_rat: 1}\n")
    result = run_cli("train", str(bad))
    assert result.returncode == 2
    assert "did you mean 'training.learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
