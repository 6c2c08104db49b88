"""data.unlabeled: texts without labels, prepared as one more split (`unlabeled`) beside train,
tokenized as train is, with the task's placeholder labels of train's shape and type, cached with
the other splits, and never scored."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from conftest import invoke, multi_label_rows, regression_rows, sentiment_rows, write_rows
from test_token_classification import ner_rows, write_conll
from transformers import AutoTokenizer

from ftcli.commands.evaluate import _check
from ftcli.config import validate
from ftcli.data import sources
from ftcli.data.prepare import prepare
from ftcli.errors import FtcliError

IGNORE = -100
TEXT_TASKS = {  # task: (rows, its label column)
    "single_label": (sentiment_rows, "label"),
    "multi_label": (multi_label_rows, "labels"),
    "regression": (regression_rows, "score"),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _data(task: str, **data):
    """The data options of a distilled student's config (data.unlabeled needs distill set)."""
    return validate({"name": "x", "task": task, "distill": {"teacher": "teacher-run"}, "data": data}).data


def _without(rows: list[dict], column: str) -> list[dict]:
    return [{key: value for key, value in row.items() if key != column} for row in rows]


def _text_task(tmp_path, task: str, count: int = 12, **data):
    """Train and unlabeled files of the same texts (the unlabeled without labels), prepared."""
    make, label = TEXT_TASKS[task]
    rows = make(count)
    train = write_rows(tmp_path / "train.jsonl", rows)
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", _without(rows, label))
    return _data(task, train=str(train), unlabeled=str(unlabeled), label_field=label, **data)


# ---------------------------------------------------------------- what the split holds


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_the_unlabeled_split_is_tokenized_as_train_with_placeholders_of_trains_type(tmp_path, tokenizer, task):
    prepared = prepare(_text_task(tmp_path, task), tokenizer, task, use_cache=False)
    train, unlabeled = prepared.splits["train"], prepared.splits["unlabeled"]
    assert unlabeled.column_names == train.column_names
    assert unlabeled.features == train.features  # labels of the same Arrow type: ints, floats, lists of floats
    for column in ("input_ids", "attention_mask", "length"):
        assert unlabeled[column] == train[column]
    placeholder = {"single_label": 0, "multi_label": [0.0, 0.0], "regression": 0.0}[task]
    assert unlabeled["labels"] == [placeholder] * len(train)
    summary = prepared.summary["unlabeled"]
    assert (summary.size, summary.label_counts, summary.label_stats, summary.labelled) == (12, {}, None, False)
    assert summary.length_max == prepared.summary["train"].length_max


def test_long_texts_are_windowed_as_train_is(tmp_path, tokenizer):
    data = _text_task(tmp_path, "single_label", max_length=6, long_text="window", stride=1)
    prepared = prepare(data, tokenizer, "single_label", use_cache=False)
    train, unlabeled = prepared.splits["train"], prepared.splits["unlabeled"]
    assert len(train) > 12 and unlabeled["doc"] == train["doc"] and unlabeled["input_ids"] == train["input_ids"]
    assert unlabeled["labels"] == [0] * len(train)
    assert (prepared.summary["unlabeled"].windows, prepared.summary["unlabeled"].windowed) == (
        prepared.summary["train"].windows, prepared.summary["train"].windowed,
    )


def _long_sentences(count: int) -> list[dict]:
    """Sentences of three ner_rows each: longer than 16 tokens, so windowed."""
    short = ner_rows(count * 3, seed=4)
    return [{key: sum((row[key] for row in short[start : start + 3]), []) for key in ("tokens", "ner_tags")} for start in range(0, len(short), 3)]


def _words_only_conll(path, rows: list[dict]):
    """A CoNLL file of words alone, a line each, a blank line between sentences."""
    path.write_text("".join("\n".join(row["tokens"]) + "\n\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "options", [{"max_length": 64}, {"max_length": 64, "label_all_subwords": True}, {"max_length": 16}], ids=["whole", "all-subwords", "windows"]
)
def test_a_taggers_untagged_words_get_the_structure_tagged_words_get(tmp_path, tokenizer, options):
    rows = ner_rows(10, seed=3) + _long_sentences(2)
    train = write_conll(tmp_path / "train.conll", rows)
    unlabeled = _words_only_conll(tmp_path / "unlabeled.conll", rows)
    data = _data("token_classification", train=str(train), unlabeled=str(unlabeled), **options)
    prepared = prepare(data, tokenizer, "token_classification", use_cache=False)
    train, unlabeled = prepared.splits["train"], prepared.splits["unlabeled"]
    assert unlabeled.column_names == train.column_names and unlabeled.features == train.features
    assert unlabeled["input_ids"] == train["input_ids"] and unlabeled["word_ids"] == train["word_ids"]
    if options["max_length"] == 16:
        assert len(train) > len(rows) and unlabeled["doc_positions"] == train["doc_positions"]
    structure = [[tag == IGNORE for tag in row] for row in train["labels"]]
    assert [[tag == IGNORE for tag in row] for row in unlabeled["labels"]] == structure
    placeholder = 1 if options.get("label_all_subwords") else 0  # a later piece of tag 0 (B-location) is I-location's
    assert {tag for row in unlabeled["labels"] for tag in row} <= {IGNORE, 0, placeholder}
    assert prepared.summary["unlabeled"].label_counts == {}


def test_a_taggers_unlabeled_text_is_cut_into_words_as_predict_cuts_it(tmp_path, tokenizer):
    rows = ner_rows(6, seed=5)
    train = write_conll(tmp_path / "train.conll", rows)
    texts = write_rows(tmp_path / "texts.jsonl", [{"tokens": " ".join(row["tokens"])} for row in rows])
    words = write_rows(tmp_path / "words.jsonl", [{"tokens": row["tokens"]} for row in rows])
    as_text, as_words = (
        prepare(_data("token_classification", train=str(train), unlabeled=str(path)), tokenizer, "token_classification", use_cache=False)
        for path in (texts, words)
    )
    assert as_text.splits["unlabeled"].column_names == as_text.splits["train"].column_names  # no spans column
    assert as_text.splits["unlabeled"].to_list() == as_words.splits["unlabeled"].to_list()


# ---------------------------------------------------------------- what is checked, what is ignored


def test_labels_in_the_unlabeled_file_are_never_read(tmp_path, tokenizer):
    rows = sentiment_rows(8)
    train = write_rows(tmp_path / "train.jsonl", rows)
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", [row | {"label": "no such class"} for row in rows])
    prepared = prepare(_data("single_label", train=str(train), unlabeled=str(unlabeled)), tokenizer, "single_label", use_cache=False)
    assert prepared.splits["unlabeled"]["labels"] == [0] * 8


def test_an_unlabeled_file_without_the_text_column_is_one_line_naming_the_split(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(8))
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", [{"body": "a text"}])
    with pytest.raises(FtcliError) as raised:
        prepare(_data("single_label", train=str(train), unlabeled=str(unlabeled)), tokenizer, "single_label", use_cache=False)
    assert raised.value.message == "split 'unlabeled' has no column 'text' (columns: body)"
    assert raised.value.hint == "set data.text_fields to one of its columns"


def test_an_unlabeled_text_that_is_no_string_is_refused_naming_its_row(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(8))
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(FtcliError) as raised:
        prepare(_data("single_label", train=str(train), unlabeled=str(unlabeled)), tokenizer, "single_label", use_cache=False)
    assert raised.value.message == "split 'unlabeled' row 2: 'text' is missing or null"


def test_sample_limits_do_not_cut_the_unlabeled_split(tmp_path, tokenizer):
    data = _text_task(tmp_path, "single_label", max_train_samples=4, max_eval_samples=2)
    prepared = prepare(data, tokenizer, "single_label", use_cache=False)
    assert (len(prepared.splits["train"]), len(prepared.splits["unlabeled"])) == (4, 12)


def test_a_fold_leaves_the_unlabeled_split_as_it_is(tmp_path, tokenizer):
    prepared = prepare(_text_task(tmp_path, "single_label", fold={"folds": 3, "index": 0}), tokenizer, "single_label", use_cache=False)
    assert len(prepared.splits["unlabeled"]) == 12 and len(prepared.splits["train"]) < 12


# ---------------------------------------------------------------- the cache


def test_the_cache_holds_the_split_and_goes_stale_when_its_file_changes(tmp_path, tokenizer):
    data = _text_task(tmp_path, "regression")
    first, second = prepare(data, tokenizer, "regression"), prepare(data, tokenizer, "regression")
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert second.splits["unlabeled"].to_list() == first.splits["unlabeled"].to_list()
    assert second.summary["unlabeled"] == first.summary["unlabeled"]
    moved = tmp_path / "elsewhere" / "same.jsonl"  # the same bytes under another path: the same data
    moved.parent.mkdir()
    moved.write_bytes((tmp_path / "unlabeled.jsonl").read_bytes())
    assert prepare(data.model_copy(update={"unlabeled": str(moved)}), tokenizer, "regression").cache_hit
    write_rows(tmp_path / "unlabeled.jsonl", [{"text": "another text"}])
    changed = prepare(data, tokenizer, "regression")
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint and len(changed.splits["unlabeled"]) == 1
    without = prepare(data.model_copy(update={"unlabeled": None}), tokenizer, "regression")
    assert "unlabeled" not in without.splits and without.fingerprint not in (first.fingerprint, changed.fingerprint)


def test_hub_data_with_a_local_unlabeled_file(tmp_path, tokenizer, monkeypatch):
    rows = sentiment_rows(8)
    monkeypatch.setattr(sources, "_load_hub", lambda source: ({"train": rows}, ["negative", "positive"]))
    unlabeled = write_rows(tmp_path / "unlabeled.jsonl", _without(rows, "label"))
    data = _data("single_label", hub="some/dataset", unlabeled=str(unlabeled))
    prepared = prepare(data, tokenizer, "single_label")
    assert prepared.splits["unlabeled"]["input_ids"] == prepared.splits["train"]["input_ids"]
    assert prepared.label_names == ["negative", "positive"]
    write_rows(tmp_path / "unlabeled.jsonl", _without(rows[:3], "label"))
    assert prepare(data, tokenizer, "single_label").fingerprint != prepared.fingerprint


# ---------------------------------------------------------------- what the commands show


def test_ftcli_prepare_shows_the_split_without_label_columns(tmp_path, tiny_model_dir):
    data = _text_task(tmp_path, "regression")
    experiment = {
        "name": "student", "task": "regression", "model": str(tiny_model_dir), "distill": {"teacher": "teacher-run"},
        "output_dir": str(tmp_path / "runs"), "data": json.loads(data.model_dump_json(exclude_defaults=True)),
    }
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(experiment))
    result = invoke("prepare", str(tmp_path / "student.yaml"))
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split()[2:] for line in result.output.splitlines() if line.startswith("│ ") and line.split()[1] in ("train", "unlabeled")}
    assert rows["unlabeled"][:5] == ["│", "12", "│", "-", "│"] and rows["train"][1] == "12"


def test_evaluate_refuses_the_unlabeled_split_and_does_not_offer_it():
    splits = {"train": None, "validation": None, "unlabeled": None}
    loaded = SimpleNamespace(run=SimpleNamespace(config_file="run/config.yaml"))
    with pytest.raises(FtcliError, match="^split 'unlabeled' holds texts without labels") as raised:
        _check(loaded, splits, ["a", "b"], "unlabeled")
    assert raised.value.hint.startswith("evaluate train or validation;")
    with pytest.raises(FtcliError) as raised:
        _check(loaded, splits, ["a", "b"], "test")
    assert raised.value.message == "split 'test' is not in this run's data (available: train, validation)"
