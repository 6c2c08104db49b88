"""token_classification's data inputs (CoNLL as .conll, .txt and .tsv; rows of tag ids with their
names; a Hub dataset's ClassLabel names), the one-line errors for data of the wrong shape,
`ftcli predict` on rows of words, and `ftcli audit` finding tags planted wrong."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import invoke
from test_token_classification import ner_rows, write_conll

from ftcli.config import validate
from ftcli.data.prepare import check_columns, load_raw_splits, prepare
from ftcli.errors import FtcliError
from ftcli.formats import read_records

NAMES = ["O", "B-person", "I-person", "B-location", "I-location"]


def _config(**data):
    return validate({"name": "x", "task": "token_classification", "data": data})


def _tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_txt_and_tsv_files_of_words_and_tags_read_as_conll(tmp_path):
    rows = ner_rows(3, seed=5)
    txt = write_conll(tmp_path / "train.txt", rows)
    tsv = write_conll(tmp_path / "dev.tsv", rows)
    config = _config(train=str(txt), validation=str(tsv), format="conll")
    splits, _ = load_raw_splits(config.data)
    assert splits["train"] == rows and splits["validation"] == rows
    # conll is token_classification's default: a .tsv of words reads as CoNLL without saying so.
    assert _config(train=str(tsv)).data.format == "conll"
    assert load_raw_splits(_config(train=str(tsv)).data)[0]["train"] == rows
    # Elsewhere a .tsv stays a table with a header.
    table = tmp_path / "table.tsv"
    table.write_text("text\tlabel\ngreat movie\tpositive\n", encoding="utf-8")
    assert read_records(table) == [{"text": "great movie", "label": "positive"}]


def test_a_txt_file_needs_format_conll_and_a_sentence_task_refuses_conll_data(tmp_path):
    with pytest.raises(FtcliError, match=r"data.train t.txt: a .txt file is read as CoNLL only: set data.format: conll"):
        validate({"name": "x", "data": {"train": "t.txt"}})
    with pytest.raises(FtcliError, match=r"CoNLL data .* set task: token_classification, not single_label"):
        validate({"name": "x", "data": {"train": "t.txt", "format": "conll"}})
    with pytest.raises(FtcliError, match=r"CoNLL data .* set task: token_classification, not regression"):
        validate({"name": "x", "task": "regression", "data": {"train": "t.tsv", "format": "conll", "label_field": "y"}})
    with pytest.raises(FtcliError, match="Input should be 'auto' or 'conll'"):
        _config(train="t.conll", format="iob")
    path = tmp_path / "t.txt"
    path.write_text("Jim B-person\n", encoding="utf-8")
    with pytest.raises(FtcliError, match="is read as CoNLL only"):
        read_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rows_of_tag_ids_take_their_names_from_data_label_names(tmp_path, tiny_model_dir, suffix):
    rows = [{"tokens": ["John", "lives", "in", "New", "York"], "ner_tags": [1, 0, 0, 3, 4]},
            {"tokens": ["Mary", "left"], "ner_tags": [1, 0]}]
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        _write_jsonl(path, rows)
    data = _config(train=str(path), label_names=NAMES).data
    prepared = prepare(data, _tokenizer(tiny_model_dir), "token_classification", use_cache=False)
    assert prepared.label_names == NAMES
    kept = [[tag for tag in sentence if tag != -100] for sentence in prepared.splits["train"]["labels"]]
    assert kept == [[1, 0, 0, 3, 4], [1, 0]]
    with pytest.raises(FtcliError, match="the tags are ids .numbers., and nothing names them"):
        prepare(_config(train=str(path)).data, _tokenizer(tiny_model_dir), "token_classification", use_cache=False)
    with pytest.raises(FtcliError, match=r"sentence 1: tag 4 is not one of the tags .*ids: 0..3"):
        prepare(_config(train=str(path), label_names=NAMES[:4]).data, _tokenizer(tiny_model_dir), "token_classification", use_cache=False)


def test_a_hub_dataset_of_class_label_tags_names_them_from_the_feature(tiny_model_dir, monkeypatch):
    """conll2003's and wnut_17's layout: ner_tags a list of ClassLabel ids (the Hub faked: no network)."""
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    hub_names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=hub_names))})
    train = Dataset.from_dict({"tokens": [["EU", "rejects", "Paris"], ["John", "Smith"]], "ner_tags": [[0, 0, 3], [1, 2]]}, features=features)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset: asked.append((name, subset)) or DatasetDict(train=train))
    data = _config(hub="conll2003").data
    prepared = prepare(data, _tokenizer(tiny_model_dir), "token_classification", use_cache=False)
    assert asked == [("conll2003", None)]
    assert prepared.label_names == hub_names  # not the ids found, and in the feature's order
    kept = [[tag for tag in sentence if tag != -100] for sentence in prepared.splits["train"]["labels"]]
    assert kept == [[0, 0, 3], [1, 2]]


# ---------------------------------------------------------------- data of the wrong shape


def _check(task: str, rows: list[dict], **data):
    config = validate({"name": "x", "task": task, "data": {"train": "t.jsonl"} | data})
    check_columns({"train": rows}, config.data, task)


def test_rows_of_words_given_to_a_sentence_task_name_token_classification():
    rows = [{"tokens": ["John", "left"], "ner_tags": ["B-person", "O"]}]
    with pytest.raises(FtcliError, match=r"row 1: 'tokens' is a list, not text") as error:
        _check("single_label", rows, text_fields=["tokens"], label_field="ner_tags")
    assert "task: token_classification" in error.value.hint


def test_sentence_level_data_given_to_token_classification_says_so(tmp_path):
    with pytest.raises(FtcliError, match="'text' is a text with one label, not a list of words") as error:
        _check("token_classification", [{"text": "a great movie", "label": "positive"}], text_fields=["text"], label_field="label")
    assert "task: single_label" in error.value.hint
    table = tmp_path / "train.tsv"  # GLUE's layout, read as CoNLL under token_classification
    table.write_text("sentence\tlabel\na great movie\t1\n", encoding="utf-8")
    with pytest.raises(FtcliError, match=r"line 2 holds 'a great movie' as one word, and CoNLL has one word per line") as error:
        read_records(table, format="conll")
    assert "sentence-level task" in error.value.hint


def test_pairs_and_tags_that_do_not_fit_the_words_are_refused():
    with pytest.raises(FtcliError, match="token_classification reads one column of words"):
        _config(train="t.conll", text_fields=["tokens", "more"])
    with pytest.raises(FtcliError, match="sentence 1: 2 words but 3 tags"):
        _check("token_classification", [{"tokens": ["a", "b"], "ner_tags": ["O", "O", "O"]}])
    with pytest.raises(FtcliError, match="sentence 1: 2 words but 1 tags"):
        _check("token_classification", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    with pytest.raises(FtcliError, match="sentence 2 is empty"):
        _check("token_classification", [{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": [], "ner_tags": []}])


# ---------------------------------------------------------------- audit and predict on a tiny tagger

PLANTED = {4: 0, 11: 1, 19: 0, 27: 1, 36: 0, 44: 1}  # sentence: its person's first word (0) or its place's (1) tagged O


def _planted_rows() -> list[dict]:
    rows = ner_rows(64, seed=11)
    for sentence, which in PLANTED.items():
        kind = "B-person" if which == 0 else "B-location"
        rows[sentence]["ner_tags"][rows[sentence]["ner_tags"].index(kind)] = "O"
    return rows


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_model_dir):
    """An audit (2 folds) of 64 sentences with 6 names tagged O, and its folder (the fold runs
    serve predict's tests too: two trainings in all, ~30 s on 2 cores)."""
    from ftcli.commands.audit import run_audit
    from ftcli.config import load_config

    root = tmp_path_factory.mktemp("ner-audit")
    train = write_conll(root / "train.conll", _planted_rows())
    experiment = {
        "name": "tagger", "task": "token_classification", "output_dir": str(root / "runs"), "model": str(tiny_model_dir),
        "data": {"train": str(train), "max_length": 32},
        "training": {"batch_size": 8, "precision": "fp32", "epochs": 6, "learning_rate": 5e-3, "logging_steps": 5},
    }
    path = root / "tagger.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return run_audit(load_config(path), folds=2), root


@pytest.mark.slow
def test_audit_ranks_the_planted_tags_first_with_their_words(audited):
    result, root = audited
    rows = _planted_rows()
    ranked = [issue["index"] for issue in result.issues]
    # Two folds of 32 sentences, 6 epochs: the tiny tagger is sure of most
    # names, not all; what it flags first is planted, and most planted tags are flagged.
    assert len(set(ranked[: len(PLANTED)]) & set(PLANTED)) >= 4 and set(ranked[:3]) <= set(PLANTED), result.issues[:10]
    first = result.issues[0]
    sentence = rows[first["index"]]
    assert first["tokens"] == " ".join(sentence["tokens"]) and first["given"].split(", ")[0] == "O"
    assert first["suggested"].split(", ")[0] in ("B-person", "B-location") and first["quality"] < 0.5
    word = first["words"].split(", ")[0]  # "Paris (word 5)": a word the planted tag sits on
    text, place = word.rsplit(" (word ", 1)
    assert sentence["tokens"][int(place.rstrip(")")) - 1] == text and sentence["ner_tags"][int(place.rstrip(")")) - 1] == "O"
    folder = root / "runs" / "tagger-audit"
    with (folder / "label_issues.csv").open() as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["rank", "index", "fold", "tokens", "words", "given", "suggested", "quality"]
    assert [int(row["index"]) for row in table] == ranked
    out_of_fold = [json.loads(line) for line in (folder / "out_of_fold.jsonl").read_text().splitlines()]
    assert len(out_of_fold) == 64 and sorted({line["fold"] for line in out_of_fold}) == [0, 1]
    for line, row in zip(out_of_fold, rows):  # a tag and a distribution over the tags per word
        assert len(line["label"]) == len(line["out_of_fold"]) == len(row["tokens"])
        assert np.allclose(np.sum(line["out_of_fold"], axis=1), 1, atol=1e-4)
    assert set(result.metrics) >= {"f1", "accuracy"} and len(result.metrics["f1"]["folds"]) == 2


@pytest.mark.slow
def test_audit_shows_in_the_terminal(audited):
    from ftcli.ui import audit_view
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(audit_view(audited[0]))
    shown = console.export_text()
    assert "words" in shown and "(word " in shown and "label issues" in shown


@pytest.mark.slow
def test_predict_tags_rows_of_words_and_conll_files(audited, tmp_path):
    _, root = audited
    run = root / "runs" / "tagger-audit" / "tagger-fold-0"
    words = _write_jsonl(tmp_path / "words.jsonl", [{"tokens": ["then", "Mary", "went", "to", "Rome", "."]}, {"tokens": ["home"]}])
    output = tmp_path / "tags.jsonl"
    result = invoke("predict", str(run), "--input", str(words), "--output", str(output))
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in output.read_text().splitlines()]
    assert first["tags"] == ["O", "B-person", "O", "O", "B-location", "O"] and second["tags"] == ["O"]
    assert [(e["entity_group"], e["word"], e["start"]) for e in first["entities"]] == [("person", "Mary", 5), ("location", "Rome", 18)]
    conll = write_conll(tmp_path / "more.conll", ner_rows(3, seed=9))
    result = invoke("predict", str(run), "--input", str(conll), "--output", str(output))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [len(line["tags"]) for line in lines] == [len(line["tokens"]) for line in lines]
    assert all("ner_tags" in line for line in lines)  # the file's own tags, beside the model's


@pytest.mark.slow
def test_predict_refuses_rows_without_their_words_in_one_line(audited, tmp_path):
    run = audited[1] / "runs" / "tagger-audit" / "tagger-fold-0"
    for rows, expected in (([{"text": ["a"]}], "input has no column 'tokens' (columns: text)"),
                           ([{"tokens": ["a"]}, {"words": ["b"]}], "input row 2: 'tokens' is missing or null"),
                           ([{"tokens": []}], "input row 1: 'tokens' is an empty list"),
                           ([{"tokens": [1, 2]}], "input row 1: 'tokens' is a list, not words")):
        path = _write_jsonl(tmp_path / "bad.jsonl", rows)
        result = invoke("predict", str(run), "--input", str(path), "--engine", "torch")
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
