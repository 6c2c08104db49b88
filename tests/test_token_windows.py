"""token_classification's long sentences: split into windows of whole words (data.stride shared),
each word trained and predicted in the window it is most central in, put back together per
sentence for metrics, predictions_<split>.jsonl and `ftcli predict`; no word is ever dropped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke
from test_token_classification import ner_config, ner_rows, trained_with_each_backend, write_conll

from ftcli.config import validate
from ftcli.data.prepare import central_windows, tokenize_words, word_windows
from ftcli.tasks.token_classification import IGNORE, TokenObjective, entity_scores

MAX_LENGTH = 16  # 14 pieces beside [CLS] and [SEP]


def _data(**values):
    return validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll", "max_length": MAX_LENGTH} | values}).data


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def long_rows(count: int, seed: int, per_row: int = 3) -> list[dict]:
    """Sentences of `per_row` learnable sentences each (20 to 40 words): longer than MAX_LENGTH."""
    short = ner_rows(count * per_row, seed)
    return [
        {key: [item for row in short[start : start + per_row] for item in row[key]] for key in ("tokens", "ner_tags")}
        for start in range(0, len(short), per_row)
    ]


# ---------------------------------------------------------------- windows of whole words


def test_windows_hold_whole_words_share_the_stride_and_cover_every_word():
    pieces = [3, 1, 2, 4, 1, 1, 3, 2, 1, 1, 2, 5, 1]
    windows = word_windows(pieces, room=6, stride=2)
    assert windows[0][0] == 0 and windows[-1][1] == len(pieces)
    for (start, end), (after, _) in zip(windows, windows[1:]):
        assert start < after <= end  # advances, and leaves no word out
        # Shares the stride's pieces, unless one more word would leave no room for the next new word.
        assert sum(pieces[after:end]) >= 2 or sum(pieces[after - 1 : end]) + pieces[end] > 6
    assert windows[-2:] == [(7, 11), (11, 13)]  # 2 + 5 pieces do not fit: nothing shared before the long word
    assert all(sum(pieces[start:end]) <= 6 for start, end in windows)
    # A word longer than a window is a window alone; the words around it are not lost.
    assert word_windows([1, 9, 1], room=6, stride=2) == [(0, 1), (1, 2), (2, 3)]


def test_each_word_belongs_to_the_window_it_is_most_central_in():
    # Ten one-piece words, windows of six sharing three: the shared words split at the middle. Word
    # 3 has two words after it in the first window, none before it in the second; word 4 ties (the
    # earlier window); word 5 has none after it in the first, two before it in the second.
    pieces = [1] * 10
    windows = word_windows(pieces, room=6, stride=3)
    assert windows == [(0, 6), (3, 9), (6, 10)]
    assert central_windows(pieces, windows) == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    # Pieces count, not words: word 2 has one piece after it in the first window, and in the
    # second word 1's four pieces before it and two after it (counted in words, a tie).
    assert central_windows([1, 4, 1, 1, 1], [(0, 4), (1, 5)]) == [0, 0, 1, 1, 1]


def test_a_sentence_of_60_words_gets_every_word_tagged_in_exactly_one_window(tokenizer):
    words = ["hamburgerization" if index % 7 == 3 else f"w{index}" for index in range(60)]
    rows = [{"tokens": words}, {"tokens": ["John", "went", "home"]}]
    dataset = tokenize_words(rows, _data(), tokenizer)
    whole = tokenizer(words, is_split_into_words=True)
    windows = [row for row in dataset if row["doc"] == 0]
    assert len(windows) > 5 and all(row["length"] <= MAX_LENGTH for row in dataset)
    reported = [place for row in windows for place in row["doc_positions"] if place >= 0]
    assert sorted(reported) == list(range(len(whole["input_ids"])))  # every token of the sentence, once
    pieces_of = np.bincount([word for word in whole.word_ids() if word is not None])
    for row in windows:
        words = np.bincount([word for word in row["word_ids"] if word is not None], minlength=len(pieces_of))
        assert ((words == 0) | (words == pieces_of)).all()  # whole words only
        for place, position in enumerate(row["doc_positions"]):
            if position >= 0:
                assert row["input_ids"][place] == whole["input_ids"][position]
                assert row["word_ids"][place] == whole.word_ids()[position]
    # The short sentence is the row it always was, reporting each of its tokens.
    (short,) = [row for row in dataset if row["doc"] == 1]
    assert short["input_ids"] == tokenizer(["John", "went", "home"], is_split_into_words=True)["input_ids"]
    assert short["doc_positions"] == list(range(short["length"]))


def test_sentences_that_fit_are_tokenized_exactly_as_before(tokenizer):
    rows = [{"tokens": ["John", "Smith", "went", "to", "Paris"]}, {"tokens": ["hamburgerization"]}]
    dataset = tokenize_words(rows, _data(), tokenizer)
    expected = tokenizer([row["tokens"] for row in rows], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    assert dataset.column_names == ["input_ids", "token_type_ids", "attention_mask", "length", "full_length", "word_ids"]
    assert dataset["input_ids"] == expected["input_ids"] and dataset["attention_mask"] == expected["attention_mask"]


def test_windows_are_the_default_with_a_stride_that_fits_a_short_max_length():
    assert (_data().long_text, _data().stride, _data(max_length=128).stride, _data(max_length=512).stride) == ("window", 4, 32, 32)
    assert (_data(stride=2).stride, _data(long_text="truncate").long_text) == (2, "truncate")  # as given: honoured


# ---------------------------------------------------------------- put back together


def test_the_merge_takes_each_token_from_the_window_that_reports_it(tokenizer):
    # Ten one-piece words in windows of six sharing three (above): words 0-4 from the first
    # window, 5-7 from the second, 8-9 from the third. Each window's logits say its own index.
    data = _data(max_length=8, stride=3)
    dataset = tokenize_words([{"tokens": ["the"] * 10}, {"tokens": ["a", "the"]}], data, tokenizer)
    assert dataset["doc"] == [0, 0, 0, 1]
    width = max(dataset["length"])
    positions = torch.full((4, width), -1, dtype=torch.long)
    for row, places in enumerate(dataset["doc_positions"]):
        positions[row, : len(places)] = torch.tensor(places)
    logits = torch.zeros(4, width, 4)
    for row in range(4):
        logits[row, :, row] = 1.0 + row
    objective = TokenObjective()
    merged = objective.aggregate(logits, torch.tensor(dataset["doc"]), 2, positions)
    assert merged.shape == (2, 12, 4)  # [CLS], ten words, [SEP]
    assert objective.predictions(merged)[0, 1:11].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert merged[0, 0].argmax() == 0 and merged[0, 11].argmax() == 2  # the specials: first and last window's
    assert torch.equal(merged[1, :4], logits[3, :4]) and not merged[1, 4:].any()  # a sentence that fits: its row
    labels = torch.tensor([[IGNORE] + [1] * (width - 1)] * 4)
    assert (objective.aggregate_labels(labels, torch.tensor(dataset["doc"]), 2, positions)[0] != IGNORE).sum() == 11


def test_windows_train_each_word_once_in_its_central_window(tmp_path, tokenizer):
    from ftcli.data.prepare import prepare

    rows = long_rows(4, seed=3)
    train = write_conll(tmp_path / "train.conll", rows)
    prepared = prepare(_data(train=str(train)), tokenizer, "token_classification", use_cache=False)
    split, summary = prepared.splits["train"], prepared.summary["train"]
    assert (summary.size, summary.windowed, summary.windows) == (4, 4, len(split)) and len(split) > 8
    for document, row in enumerate(rows):
        labelled = [tag for labels, doc in zip(split["labels"], split["doc"]) if doc == document for tag in labels if tag != IGNORE]
        assert len(labelled) == len(row["tokens"])  # every word tagged, once
    assert sum(summary.label_counts.values()) == sum(len(row["tokens"]) for row in rows)


# ---------------------------------------------------------------- end to end


def windows_config(root: Path, model_dir: Path, backend: str) -> Path:
    return ner_config(
        root, model_dir, backend, name="windows", rows=(long_rows(32, seed=1), long_rows(12, seed=2)),
        # The kept model's logged eval loss is evaluate's (a temperature would change it).
        settings={"calibration": "none"}, max_length=MAX_LENGTH,
    )


@pytest.fixture(scope="module")
def window_runs(tmp_path_factory, tiny_model_dir):
    """A tagger trained with each backend on sentences two or three windows long."""
    root = tmp_path_factory.mktemp("token-windows")
    return trained_with_each_backend(root, lambda backend: windows_config(root, tiny_model_dir, backend))


@pytest.mark.slow  # its file's trainings: run first (conftest)
@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_windowed_taggers_metrics_are_those_of_its_per_word_predictions(window_runs, backend):
    run = window_runs[backend]
    result = invoke("evaluate", str(run))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    rows = long_rows(12, seed=2)
    assert len(lines) == 12 and [line["tokens"] for line in lines] == [row["tokens"] for row in rows]
    assert all(len(line["prediction"]) == len(line["tokens"]) == len(line["gold"]) for line in lines)  # every word
    assert [line["gold"] for line in lines] == [row["ner_tags"] for row in rows]
    scores = entity_scores([line["prediction"] for line in lines], [line["gold"] for line in lines])["micro"]
    record = json.loads((run / "eval_validation.json").read_text())
    assert record["f1"] == pytest.approx(scores["f1"]) and record["recall"] == pytest.approx(scores["recall"])
    assert record["f1"] > 0.5
    # Evaluation during training put the windows together too: the kept (best) model's F1 and loss
    # (a mean over sentences, which a mean over windows would not give) are those logged.
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_f1" in line]
    best = [event for event in evaluations if event["eval_f1"] == max(event["eval_f1"] for event in evaluations)]
    assert best[0]["eval_f1"] == pytest.approx(record["f1"])
    assert any(event["eval_loss"] == pytest.approx(record["loss"], rel=1e-5) for event in best), (best, record["loss"])


def test_prepare_reports_the_sentences_split_into_windows(window_runs):
    result = invoke("prepare", str(window_runs["loop"]))
    assert result.exit_code == 0, result.output
    assert "windows" in result.output and "truncated" not in result.output and "were cut" not in result.output
    from transformers import AutoTokenizer

    from ftcli.config import load_config
    from ftcli.data.prepare import prepare

    config = load_config(window_runs["loop"])
    prepared = prepare(config.data, AutoTokenizer.from_pretrained(window_runs["loop"] / "model"), config.task)
    for split, sentences in (("train", 32), ("validation", 12)):
        summary = prepared.summary[split]
        assert (summary.size, summary.windowed, summary.windows) == (sentences, sentences, len(prepared.splits[split]))
        assert re.search(rf"{split[:5]}.*\b{sentences} +│ +{summary.windows} +│", result.output)  # the row: windowed, windows


def test_predict_finds_entities_over_a_whole_long_text_with_their_offsets(window_runs):
    filler = "then the friends went home today and later " * 6
    text = "Paris " + filler + "and   John Smith saw Tokyo ."
    result = invoke("predict", str(window_runs["loop"]), "--text", text)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    found = [(e["entity_group"], e["word"], e["start"], e["end"]) for e in row["entities"]]
    assert ("person", "John Smith", text.index("John"), text.index("John") + 10) in found
    assert ("location", "Tokyo", text.index("Tokyo"), text.index("Tokyo") + 5) in found
    assert all(text[start:end] == word for _, word, start, end in found)
    assert len(text.split()) > 3 * MAX_LENGTH


def test_the_server_reads_a_long_text_in_windows_as_predict_does(window_runs):
    from test_serve import serving

    from ftcli.commands.predict import predict

    text = "Paris " + "then the friends went home today and later " * 6 + "and John Smith saw Tokyo ."
    short = "John Smith saw Tokyo"
    expected = [row["entities"] for row in predict(window_runs["loop"], None, text=text, engine="torch")]
    expected += [row["entities"] for row in predict(window_runs["loop"], None, text=short, engine="torch")]
    with serving(window_runs["loop"]) as client:
        answer = client.post("/v1/predict", json={"inputs": [text, short]})
    assert answer.status_code == 200, answer.text
    served = [row["entities"] for row in answer.json()["predictions"]]
    assert [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in served] == \
        [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in expected]
    assert [e["score"] for row in served for e in row] == pytest.approx([e["score"] for row in expected for e in row], abs=1e-5)
    assert any(e["word"] == "Tokyo" for e in served[0])  # a word past the first window


def test_the_onnx_path_refuses_a_sentence_it_would_cut_and_auto_predicts_with_torch(window_runs):
    from ftcli.commands.predict import predict
    from ftcli.errors import FtcliError

    run = window_runs["trainer"]
    result = invoke("export", str(run))
    assert result.exit_code == 0, result.output
    text = "Paris " + "then the friends went home today and later " * 6 + "and John Smith saw Tokyo ."
    with pytest.raises(FtcliError, match=r"input row 1 is longer than data.max_length=16 tokens, and the ONNX path reads no windows"):
        predict(run, None, text=text, engine="onnx")
    assert predict(run, None, text=text, engine="auto") == predict(run, None, text=text, engine="torch")
    (onnx,) = predict(run, None, text="John Smith saw Tokyo", engine="onnx")  # what fits is the export's to tag
    (torch_row,) = predict(run, None, text="John Smith saw Tokyo", engine="torch")
    assert [(e["entity_group"], e["start"], e["end"]) for e in onnx["entities"]] == [(e["entity_group"], e["start"], e["end"]) for e in torch_row["entities"]]
    assert [e["score"] for e in onnx["entities"]] == pytest.approx([e["score"] for e in torch_row["entities"]], abs=1e-4)
