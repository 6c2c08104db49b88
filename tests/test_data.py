"""Data: every file format, single texts and pairs, labels, truncation stats, the cache."""

from __future__ import annotations

import json

import pytest
from conftest import invoke, sentiment_rows, write_rows
from transformers import AutoTokenizer

from ftcli.config import DataConfig
from ftcli.data.batching import collate
from ftcli.data.padding import length_sorted_batches
from ftcli.data.prepare import prepare, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_prepare_reads_every_format(tmp_path, tokenizer, suffix, pair):
    train = write_rows(tmp_path / f"train{suffix}", sentiment_rows(20, pair=pair))
    fields = ["sentence1", "sentence2"] if pair else ["text"]
    prepared = prepare(DataConfig(train=str(train), text_fields=fields, max_length=32), tokenizer, "single_label")
    split = prepared.splits["train"]
    assert len(split) == 20
    assert set(split.column_names) >= {"input_ids", "attention_mask", "labels", "length"}
    first = split[0]
    decoded = tokenizer.decode(first["input_ids"], skip_special_tokens=False)
    assert decoded.count("[SEP]") == (2 if pair else 1)  # pairs are encoded as pairs
    if pair:
        assert set(first["token_type_ids"]) == {0, 1}
    assert prepared.summary["train"].label_counts == {name: 10 for name in prepared.label_names}


def test_labels_inferred_and_sorted_or_taken_from_config(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(8))
    inferred = prepare(DataConfig(train=str(train)), tokenizer, "single_label")
    assert inferred.label_names == ["negative", "positive"]
    assert inferred.splits["train"]["labels"][:2] == [0, 1]  # rows alternate negative, positive
    given = prepare(DataConfig(train=str(train), label_names=["positive", "negative"]), tokenizer, "single_label")
    assert given.splits["train"]["labels"][:2] == [1, 0]


def test_integer_labels_with_names_map_by_position(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(8, pair=True))
    prepared = prepare(
        DataConfig(train=str(train), text_fields=["sentence1", "sentence2"], label_names=["no", "yes"]), tokenizer, "single_label"
    )
    assert prepared.label_names == ["no", "yes"] and prepared.splits["train"]["labels"][:2] == [0, 1]


def test_truncation_is_counted(tmp_path, tokenizer):
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}]
    train = write_rows(tmp_path / "train.jsonl", rows)
    prepared = prepare(DataConfig(train=str(train), max_length=16), tokenizer, "single_label")
    summary = prepared.summary["train"]
    assert summary.truncated == 1 and summary.length_max == 52
    assert max(prepared.splits["train"]["length"]) == 16


def test_tokenizer_fingerprint_ignores_the_last_calls_truncation_and_padding(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a b c"], truncation=True, max_length=7, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == before


def test_tokenizer_fingerprint_changes_with_the_columns_and_the_truncated_end(tiny_model_dir):
    plain = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    without_types = AutoTokenizer.from_pretrained(tiny_model_dir, model_input_names=["input_ids", "attention_mask"])
    left = AutoTokenizer.from_pretrained(tiny_model_dir, truncation_side="left")
    assert len({plain, tokenizer_fingerprint(without_types), tokenizer_fingerprint(left)}) == 3


def test_second_prepare_is_a_cache_hit_and_changes_invalidate(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))  # empty, whatever ran before
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(8))
    config = DataConfig(train=str(train), max_length=32)
    first = prepare(config, tokenizer, "single_label")
    second = prepare(config, tokenizer, "single_label")
    assert not first.cache_hit and second.cache_hit and first.fingerprint == second.fingerprint
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    assert prepare(config.model_copy(update={"max_length": 16}), tokenizer, "single_label").fingerprint != first.fingerprint
    write_rows(train, sentiment_rows(8, seed=5))
    assert not prepare(config, tokenizer, "single_label").cache_hit  # the file changed


def test_prepare_command_reports_summary_and_cache_hit(make_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))  # empty: other tests tokenize the same data
    experiment = make_experiment(pair=True)
    first = invoke("prepare", str(experiment))
    assert first.exit_code == 0, first.output
    assert "tokenized and cached" in first.stdout and "validation" in first.stdout and "p95" in first.stdout
    second = invoke("prepare", str(experiment))
    assert "cache hit" in second.stdout


def test_sample_limits(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(30))
    validation = write_rows(tmp_path / "validation.jsonl", sentiment_rows(30))
    config = DataConfig(train=str(train), validation=str(validation), max_train_samples=10, max_eval_samples=4)
    prepared = prepare(config, tokenizer, "single_label")
    assert (len(prepared.splits["train"]), len(prepared.splits["validation"])) == (10, 4)


def test_collate_pads_to_longest_and_multiple():
    rows = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [4], "attention_mask": [1], "labels": 0},
    ]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert collate(rows, pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_sorted_batches(lengths, batch_size=3)
    flat = [int(i) for batch in batches for i in batch]
    assert sorted(flat) == list(range(7))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_length_grouping_keeps_every_example_and_cuts_padding():
    import numpy as np

    from ftcli.data.batching import length_grouped_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    shuffled = rng.permutation(1000)
    grouped = length_grouped_order(lengths, shuffled, batch_size=8, mega_batches=10)
    assert sorted(grouped.tolist()) == list(range(1000))

    def padded_tokens(order):
        return sum(lengths[order[i : i + 8]].max() * len(order[i : i + 8]) for i in range(0, 1000, 8))

    assert lengths.sum() / padded_tokens(grouped) > 0.9 > lengths.sum() / padded_tokens(shuffled)


def test_device_tensors_gather_batches_like_collate(tmp_path, tokenizer):
    import torch

    from ftcli.data.batching import DeviceTensors

    train = write_rows(tmp_path / "train.jsonl", sentiment_rows(12, pair=True))
    split = prepare(DataConfig(train=str(train), text_fields=["sentence1", "sentence2"]), tokenizer, "single_label").splits["train"]
    on_device = DeviceTensors(split, tokenizer.pad_token_id, torch.device("cpu"))
    indices = [3, 0, 7]
    expected = collate([split[i] for i in indices], tokenizer.pad_token_id)
    gathered = on_device.batch(indices)
    assert set(gathered) == set(expected)
    for column in expected:
        assert torch.equal(gathered[column], expected[column]), column


# ---------------------------------------------------------------- csv and tsv quoting

# GLUE's tsv files have no quoting: a sentence may start with a literal quote (transformers' own MRPC
# fixture holds such lines). Read as quoted, row 2's opening quote swallowed row 3.
GLUE_TSV = (
    "label\tsentence1\tsentence2\n"
    '1\t" It is over , " he said .\tHe said it was over .\n'
    '0\t" Unbalanced quote opens here\tand nothing closes it .\n'
    "1\tA plain line .\tAnother plain line .\n"
    '0\tShe called it " a mess " .\tIt was tidy .\n'
)
# pandas wraps a text that holds a quote (or a tab) in quotes and doubles the inner ones (GoEmotions' tsv files).
PANDAS_TSV = 'text\tlabel\n"she said ""hi"" to me"\tpositive\nplain text\tnegative\n"a tab\tinside"\tpositive\n'


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_glue_tsv_keeps_every_line_a_row_with_its_quotes(tmp_path):
    from ftcli.formats import read_records

    rows = read_records(_write(tmp_path / "glue.tsv", GLUE_TSV))
    assert len(rows) == 4  # one per line: nothing merged
    assert rows[0]["sentence1"] == '" It is over , " he said .' and rows[1]["sentence2"] == "and nothing closes it ."
    assert [row["label"] for row in rows] == ["1", "0", "1", "0"]


def test_pandas_tsv_is_unquoted(tmp_path):
    from ftcli.formats import read_records

    rows = read_records(_write(tmp_path / "quoted.tsv", PANDAS_TSV))
    assert [row["text"] for row in rows] == ['she said "hi" to me', "plain text", "a tab\tinside"]


def test_a_quote_that_would_join_lines_stops_with_the_fix_and_quoting_chooses(tmp_path):
    from ftcli.formats import read_records
    from ftcli.errors import FtcliError

    joined = _write(tmp_path / "joined.tsv", 'text\tlabel\n"opens here\tpositive\ncloses here"\tnegative\nplain\tpositive\n')
    with pytest.raises(FtcliError, match="a quote at line 2 opens a field that runs to line 3.*data.quoting: none"):
        read_records(joined)
    assert [row["text"] for row in read_records(joined, quoting="none")] == ['"opens here', 'closes here"', "plain"]
    multiline = _write(tmp_path / "multiline.csv", 'text,label\n"line one\nline two",positive\nplain,negative\n')
    with pytest.raises(FtcliError, match="data.quoting: quoted"):
        read_records(multiline)
    assert read_records(multiline, quoting="quoted")[0]["text"] == "line one\nline two"
    with pytest.raises(FtcliError, match="line 2 has 1 fields but the header has 2"):
        read_records(multiline, quoting="none")


def test_glue_tsv_trains_end_to_end(tmp_path, make_experiment):
    rows = "".join(f"{index % 2}\t\" quoted start {index}\tsecond {index}\n" for index in range(16))
    train = _write(tmp_path / "train.tsv", "label\tsentence1\tsentence2\n" + rows)
    experiment = make_experiment(
        data={"train": train, "validation": train, "text_fields": ["sentence1", "sentence2"]},
        training={"max_steps": 2, "eval_every": 2, "save_every": 2},
    )
    result = invoke("prepare", str(experiment))
    assert result.exit_code == 0, result.output
    assert "16" in result.output  # all 16 rows, none merged


def test_jsonl_lines_split_only_at_line_ends(tmp_path, tokenizer):
    # json.dumps(ensure_ascii=False) leaves U+2028 (a line separator) raw inside a string; str.splitlines
    # would cut the line there and call it invalid JSON.
    rows = [{"text": "first\u2028still the first", "label": "a"}, {"text": "second", "label": "b"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    prepared = prepare(DataConfig(train=str(train)), tokenizer, "single_label")
    assert len(prepared.splits["train"]) == 2


# ---------------------------------------------------------------- labels: ids in every format, wrong kinds


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_integer_ids_mean_the_same_in_every_format(tmp_path, tokenizer, suffix):
    rows = [{"text": f"example {index}", "label": index % 11} for index in range(22)]
    train = write_rows(tmp_path / f"train{suffix}", rows)
    inferred = prepare(DataConfig(train=str(train)), tokenizer, "single_label")
    # Sorted as numbers, whether they arrive as numbers (jsonl, parquet) or as text (csv, tsv).
    assert inferred.label_names == [str(index) for index in range(11)]
    assert inferred.splits["train"]["labels"] == [index % 11 for index in range(22)]
    names = [f"class{index}" for index in range(11)]
    given = prepare(DataConfig(train=str(train), label_names=names), tokenizer, "single_label")
    assert given.splits["train"]["labels"] == [index % 11 for index in range(22)]


def test_csv_ids_with_label_names_train(tmp_path, make_experiment):
    train = write_rows(tmp_path / "pairs.csv", sentiment_rows(32, pair=True))
    experiment = make_experiment(
        data={
            "train": str(train), "validation": str(train), "text_fields": ["sentence1", "sentence2"],
            "label_names": ["not_equivalent", "equivalent"],
        },
        training={"max_steps": 2, "eval_every": 2, "save_every": 2},
    )
    result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    id2label = json.loads((tmp_path / "runs" / "tiny" / "model" / "config.json").read_text())["id2label"]
    assert id2label == {"0": "not_equivalent", "1": "equivalent"}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0.5, 3.8, 2.0, 1.25], "label 0.5 is a number with a fraction"),
        (["0.5", "3.8", "2", "1"], "label '0.5' is a number with a fraction"),
        ([0, 1, "positive", "negative"], "labels mix numbers and names (row 1: 0, row 3: 'positive')"),
        ([["a", "b"], ["a"], ["b"], []], "label ['a', 'b'] is a list, not one class"),
        ([{"a": 1}, {"b": 1}, {"a": 1}, {"b": 1}], "is a dict, not one class"),
    ],
    ids=["floats", "float-text", "mixed", "lists", "dicts"],
)
def test_labels_of_the_wrong_kind_stop_with_one_line(tmp_path, tokenizer, labels, message):
    from ftcli.errors import FtcliError

    rows = [{"text": f"text {index}", "label": label} for index, label in enumerate(labels)]
    train = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(FtcliError) as raised:
        prepare(DataConfig(train=str(train)), tokenizer, "single_label")
    assert message in str(raised.value)


def test_whole_number_floats_and_boolean_text_are_ids_and_names(tmp_path, tokenizer):
    rows = [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}]
    assert prepare(DataConfig(train=str(write_rows(tmp_path / "f.jsonl", rows))), tokenizer, "single_label").label_names == ["0", "1"]
    csv_rows = [{"text": "a", "label": "True"}, {"text": "b", "label": "False"}]
    json_rows = [{"text": "a", "label": True}, {"text": "b", "label": False}]
    from_csv = prepare(DataConfig(train=str(write_rows(tmp_path / "b.csv", csv_rows))), tokenizer, "single_label")
    from_json = prepare(DataConfig(train=str(write_rows(tmp_path / "b.jsonl", json_rows))), tokenizer, "single_label")
    assert from_csv.label_names == from_json.label_names == ["false", "true"]


LONG = "the plot was " + "rather slow and " * 12 + "then wonderful"


@pytest.mark.parametrize(
    ("task", "fields", "rows", "long_text"),
    [
        ("single_label", ["text"], [{"text": "a lovely film"}, {"text": LONG}], "truncate"),
        ("single_label", ["premise", "claim"], [{"premise": LONG, "claim": "a short claim"}, {"premise": "brief", "claim": "no"}], "window"),
        ("token_classification", ["tokens"], [{"tokens": LONG.split()}, {"tokens": "Smith went to Paris"}], "window"),
        ("token_classification", ["tokens"], [{"tokens": LONG.split()}], "truncate"),
    ],
    ids=["texts-truncated", "pairs-windowed", "words-windowed", "words-truncated"],
)
def test_predicts_columns_are_the_rows_of_the_training_split(tokenizer, task, fields, rows, long_text):
    """ftcli predict tokenizes without datasets (tokenize_columns): the rows, columns and their
    order are those tokenize_for's Dataset holds, so its predictions are those of a Dataset."""
    from ftcli.config import validate
    from ftcli.data.prepare import tokenize_columns, tokenize_for

    data = validate(
        {"name": "x", "task": task, "data": {"train": "t.jsonl", "text_fields": fields, "max_length": 12, "long_text": long_text, "stride": 4}}
    ).data
    dataset, columns = tokenize_for(task, rows, data, tokenizer), tokenize_columns(task, rows, data, tokenizer)
    assert columns.column_names == dataset.column_names and len(columns) == len(dataset)
    assert ("doc" in columns.column_names) == (long_text == "window")  # the long text was read in windows
    assert columns.to_list() == dataset.to_list() == list(columns)
    assert all(columns[name] == list(dataset[name]) for name in dataset.column_names)
