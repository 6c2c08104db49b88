"""token_classification: CoNLL files, tag schemes, sub-token alignment, entity metrics against
seqeval's strict mode, and training, evaluating and predicting end to end on a tiny BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import invoke

from ftcli.config import validate
from ftcli.errors import FtcliError
from ftcli.formats import read_records
from ftcli.tasks import get
from ftcli.tasks.token_classification import IGNORE, align, detect_scheme, entities, to_iob2

PEOPLE = [["John", "Smith"], ["Mary"], ["Peter", "Brown"], ["Anna"], ["Paul", "Jones"], ["Lucy"]]
PLACES = [["Paris"], ["London"], ["New", "York"], ["Berlin"], ["Rome"], ["Tokyo"]]
FILLER = ["the", "a", "went", "to", "saw", "and", "then", "home", "today", "with", "friends", "later"]


def ner_rows(count: int, seed: int) -> list[dict]:
    """Sentences of filler words with a person and a place from fixed lists: learnable."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for kind, names in (("person", PEOPLE), ("location", PLACES)):
            tokens += rng.sample(FILLER, rng.randint(1, 3))
            tags += ["O"] * (len(tokens) - len(tags))
            name = rng.choice(names)
            tokens += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        tokens.append(".")
        tags.append("O")
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["-DOCSTART- O", ""]
    for row in rows:
        lines += [f"{word}\t{tag}" for word, tag in zip(row["tokens"], row["ner_tags"])] + ["\t"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ner_config(
    root: Path, model_dir: Path, backend: str, *, name: str = "ner", rows: tuple[list[dict], list[dict]] | None = None,
    settings: dict | None = None, **data,
) -> Path:
    """A tagger's experiment, written under root: rows are its training and validation sentences
    (ner_rows' by default), settings its top-level options beside these, data its data options."""
    train_rows, validation_rows = rows or (ner_rows(96, seed=1), ner_rows(40, seed=2))
    train = write_conll(root / "data" / "train.conll", train_rows)
    validation = write_conll(root / "data" / "dev.conll", validation_rows)
    experiment = {
        "name": f"{name}-{backend}",
        "task": "token_classification",
        "backend": backend,
        "output_dir": str(root / "runs"),
        "model": str(model_dir),
        "data": {"train": str(train), "validation": str(validation), "max_length": 32} | data,
        "training": {"batch_size": 8, "logging_steps": 5, "precision": "fp32", "epochs": 3, "learning_rate": 5e-3},
    } | (settings or {})
    path = root / f"{name}-{backend}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def trained_with_each_backend(root: Path, config_for) -> dict[str, Path]:
    """The run directory of a training with each backend, of the experiment config_for(backend) writes."""
    runs = {}
    for backend in ("loop", "trainer"):
        path = config_for(backend)
        result = invoke("train", str(path))
        assert result.exit_code == 0, result.output
        runs[backend] = root / "runs" / yaml.safe_load(path.read_text())["name"]
    return runs


# ---------------------------------------------------------------- files and tag schemes


def test_a_conll_file_reads_as_sentences_of_words_and_tags(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nJim B-person\nlives\tO\n\n  \n\nin O\nHamburg  B-location\n", encoding="utf-8")
    assert read_records(path) == [
        {"tokens": ["Jim", "lives"], "ner_tags": ["B-person", "O"]},
        {"tokens": ["in", "Hamburg"], "ner_tags": ["O", "B-location"]},
    ]


def test_a_word_without_a_tag_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("Jim B-person\nlives\n", encoding="utf-8")
    with pytest.raises(FtcliError, match=r"x.conll: line 2 has a word but no tag"):
        read_records(path)


def test_iob1_and_bioes_are_read_into_iob2_and_a_bad_sequence_is_refused():
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]]) == "iob1"
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], "iob1") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert detect_scheme([["S-PER", "B-LOC", "E-LOC"]]) == "bioes"
    assert to_iob2(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], "bioes") == ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert to_iob2(["O", "I-PER"], "iob2") is None
    assert to_iob2(["B-LOC", "O"], "bioes") is None  # B- must go on to I- or E-


def _data(**values):
    return validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll"} | values}).data


def test_label_errors_name_the_sentence_and_the_fix():
    task, data = get("token_classification"), _data()
    with pytest.raises(FtcliError, match=r"split .train. \(t.conll\) sentence 1: 2 words but 1 tags"):
        task.check_labels([{"tokens": ["a", "b"], "ner_tags": ["O"]}], data, "split 'train'")
    with pytest.raises(FtcliError, match="sentence 2 is empty"):
        task.check_labels([{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": [], "ner_tags": []}], data, "split 'train'")
    with pytest.raises(FtcliError, match="sentence 1: tags O I-PER are no valid IOB2 sequence"):
        task.check_labels([{"tokens": ["a", "b"], "ner_tags": ["O", "I-PER"]}], _data(tag_scheme="iob2"), "split 'train'")


def test_the_config_refuses_what_token_classification_cannot_do():
    with pytest.raises(Exception, match="set task: token_classification"):
        validate({"name": "x", "data": {"train": "t.conll"}})
    with pytest.raises(Exception, match="one column of words"):
        validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll", "text_fields": ["a", "b"]}})
    with pytest.raises(Exception, match="data.tag_scheme is for task: token_classification"):
        validate({"name": "x", "data": {"train": "t.jsonl", "tag_scheme": "bioes"}})
    config = validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll"}})
    assert (config.data.text_fields, config.data.label_field) == (["tokens"], "ner_tags")
    assert config.metrics == ["f1", "precision", "recall", "accuracy"]


# ---------------------------------------------------------------- alignment and metrics


def test_a_word_is_tagged_on_its_first_piece_or_on_every_piece():
    names = ["O", "B-person", "I-person"]
    word_ids = [None, 0, 0, 1, None]
    assert align(word_ids, [1, 0], names, all_subwords=False) == [IGNORE, 1, IGNORE, 0, IGNORE]
    assert align(word_ids, [1, 0], names, all_subwords=True) == [IGNORE, 1, 2, 0, IGNORE]


def test_entity_metrics_match_seqeval_strict_mode_on_random_sequences():
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    rng = np.random.default_rng(0)
    task = get("token_classification")
    for trial in range(20):
        lengths = rng.integers(1, 12, size=30)
        gold_ids = [rng.integers(0, len(names), size=n) for n in lengths]
        predicted_ids = [np.where(rng.random(n) < 0.6, g, rng.integers(0, len(names), size=n)) for n, g in zip(lengths, gold_ids)]
        width = int(lengths.max()) + 2
        references = np.full((30, width), IGNORE)
        predictions = np.zeros((30, width), dtype=np.int64)
        for row, (g, p) in enumerate(zip(gold_ids, predicted_ids)):
            references[row, 1 : 1 + len(g)], predictions[row, 1 : 1 + len(p)] = g, p
        gold = [[names[i] for i in g] for g in gold_ids]
        predicted = [[names[i] for i in p] for p in predicted_ids]
        ours = {name: task.metric(name, predictions, references, len(names), names=names) for name in ("f1", "precision", "recall", "f1_macro", "accuracy")}
        strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        assert ours["f1"] == pytest.approx(f1_score(gold, predicted, **strict)), trial
        assert ours["precision"] == pytest.approx(precision_score(gold, predicted, **strict)), trial
        assert ours["recall"] == pytest.approx(recall_score(gold, predicted, **strict)), trial
        assert ours["f1_macro"] == pytest.approx(f1_score(gold, predicted, average="macro", **strict)), trial
        assert ours["accuracy"] == pytest.approx(accuracy_score(gold, predicted)), trial
    assert entities(["I-PER", "B-PER", "I-PER", "I-LOC"]) == [("PER", 1, 3)]


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ner_runs(tmp_path_factory, tiny_model_dir):
    """A tagger trained with each backend on learnable names and places."""
    root = tmp_path_factory.mktemp("ner")
    return trained_with_each_backend(root, lambda backend: ner_config(root, tiny_model_dir, backend))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_a_tagger_learns_names_and_places(ner_runs, backend):
    events = _events(ner_runs[backend])
    losses = [event["train_loss"] for event in events if "train_loss" in event]
    f1 = [event["eval_f1"] for event in events if "eval_f1" in event]
    assert losses[-1] < losses[0] / 3, losses
    assert f1[-1] > f1[0] and f1[-1] > 0.8, f1
    validation = json.loads((ner_runs[backend] / "metrics.json").read_text())["validation"]
    assert set(validation) == {"loss", "f1", "precision", "recall", "accuracy"} and validation["accuracy"] > 0.9


def test_evaluate_writes_tags_per_word_and_a_table_per_type(ner_runs):
    result = invoke("evaluate", str(ner_runs["loop"]))
    assert result.exit_code == 0, result.output
    assert "person" in result.output and "location" in result.output
    record = json.loads((ner_runs["loop"] / "eval_validation.json").read_text())
    per_type = {row["label"]: row for row in record["errors"]["per_class"]}
    assert per_type["person"]["support"] == 40 and per_type["location"]["support"] == 40
    assert per_type["micro"]["f1"] == pytest.approx(record["f1"])
    lines = [json.loads(line) for line in (ner_runs["loop"] / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    first = ner_rows(40, seed=2)[0]
    assert lines[0]["tokens"] == first["tokens"] and lines[0]["gold"] == first["ner_tags"]
    assert len(lines[0]["prediction"]) == len(first["tokens"])
    assert np.mean([line["correct"] for line in lines]) > 0.5


def test_predict_gives_entities_with_offsets_as_the_pipeline_does(ner_runs):
    from transformers import pipeline

    text = "then John Smith went to   Paris today"
    result = invoke("predict", str(ner_runs["trainer"]), "--text", text)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    ours = row["entities"]
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in ours] == [("person", "John Smith", 5, 15), ("location", "Paris", 26, 31)]
    tagger = pipeline("token-classification", model=str(ner_runs["trainer"] / "model"), aggregation_strategy="simple", device="cpu")
    theirs = tagger(text)
    assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == [(e["entity_group"], e["start"], e["end"]) for e in ours]
    assert [e["word"] for e in theirs] == [e["word"].lower() for e in ours]  # the pipeline decodes an uncased vocabulary's pieces
    assert [float(e["score"]) for e in theirs] == pytest.approx([e["score"] for e in ours], abs=1e-5)


# ---------------------------------------------------------------- tokenizing words


def _byte_level_tokenizer():
    """A small RoBERTa-style (byte-level BPE) tokenizer, trained here: no Hub."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["John Smith went to Paris today and then home with friends"] * 50, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", mask_token="<mask>")


def test_byte_level_bpe_reads_each_word_as_following_a_space():
    from ftcli.data.prepare import tokenize_words
    from ftcli.data.words import split_words

    tokenizer = _byte_level_tokenizer()
    tokenized = tokenize_words([{"tokens": ["then", "Smith", "went"]}], _data(), tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(tokenized["input_ids"][0])
    assert pieces[2:4] == ["ĠSmith", "Ġwent"]  # as in running text; without the prefix space: Sm, ith, w, ent
    assert split_words("John  Smith went", tokenizer) == [("John", (0, 4)), ("Smith", (6, 11)), ("went", (12, 16))]


def test_a_long_sentence_is_windowed_and_only_long_text_truncate_cuts_it_with_a_warning(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    from ftcli.data.prepare import tokenize_words

    rows = [{"tokens": ["word"] * 20}, {"tokens": ["short"]}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    windowed = tokenize_words(rows, _data(max_length=8), tokenizer)  # the default: windows (tests/test_token_windows.py)
    assert windowed["doc"] == [0, 0, 0, 0, 0, 1] and "were cut" not in caplog.text
    assert sorted({word for ids in windowed["word_ids"][:5] for word in ids if word is not None}) == list(range(20))
    tokenized = tokenize_words(rows, _data(max_length=8, long_text="truncate"), tokenizer)
    assert tokenized["word_ids"][0] == [None, 0, 1, 2, 3, 4, 5, None]
    assert "1 sentences are longer than data.max_length=8 tokens: their last 14 words were cut" in caplog.text


# ---------------------------------------------------------------- the objective


def test_evaluation_loss_is_each_sentences_mean_and_training_weighs_every_tagged_piece_alike():
    import torch
    import torch.nn.functional as F

    from ftcli.tasks.token_classification import TokenObjective, pieces_per_sentence

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[IGNORE, 1, IGNORE, 0, IGNORE], [IGNORE, 2, 2, 0, 1]])
    plain = TokenObjective()
    first = F.cross_entropy(logits[0, [1, 3]], labels[0, [1, 3]])
    second = F.cross_entropy(logits[1, 1:], labels[1, 1:])
    assert torch.allclose(plain.losses(logits, labels), torch.stack([first, second]))
    assert torch.allclose(plain.loss_sum(logits, labels), first + second)
    assert torch.allclose(plain.training_loss_sum(logits, labels, torch.tensor([True, False])), first * 2)  # 2 pieces, 1 a sentence
    # Training weighs every labelled piece alike: each sentence's sum over the split's mean pieces per sentence.
    per_sentence = pieces_per_sentence(labels.tolist())
    assert per_sentence == 3.0 and pieces_per_sentence([[IGNORE]]) == 1.0
    weights = torch.tensor([1.0, 2.0, 0.5])
    smoothed = TokenObjective(weights, 0.1, per_sentence).training_loss_sum(logits, labels)
    expected = sum(
        F.cross_entropy(logits[row, kept], labels[row, kept], weight=weights, reduction="none", label_smoothing=0.1).sum()
        for row, kept in ((0, [1, 3]), (1, [1, 2, 3, 4]))
    ) / per_sentence
    assert torch.allclose(smoothed, expected)
    mean_training = TokenObjective(pieces_per_sentence=per_sentence).training_loss_sum(logits, labels) / 2  # over examples
    assert torch.allclose(mean_training, F.cross_entropy(logits.transpose(1, 2), labels))  # HF's mean over the batch's pieces
    assert plain.predictions(logits).shape == (2, 5)


def test_label_smoothing_and_lora_are_read():
    assert validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll"},
                     "training": {"label_smoothing": 0.1}}).training.label_smoothing == 0.1
    assert validate({"name": "x", "task": "token_classification", "data": {"train": "t.conll"}, "lora": {"r": 4}}).lora.r == 4


def test_jsonl_rows_of_words_and_iob1_tags_prepare_into_iob2_tags_per_piece(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from ftcli.data.prepare import prepare

    rows = [{"words": ["Hamburgerization", "in", "Paris"], "tags": ["I-LOC", "O", "I-LOC"]},
            {"words": ["Anna", "Hamburgerization"], "tags": ["I-PER", "I-LOC"]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pieces = len(tokenizer.tokenize("hamburgerization"))
    assert pieces > 1
    for all_subwords, later in ((False, [IGNORE] * (pieces - 1)), (True, [2] * (pieces - 1))):
        data = _data(train=str(train), text_fields=["words"], label_field="tags", label_all_subwords=all_subwords)
        prepared = prepare(data, tokenizer, "token_classification", use_cache=False)
        assert prepared.label_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
        assert prepared.splits["train"]["labels"][0] == [IGNORE, 1, *later, 0, 1, IGNORE]
    assert prepared.summary["train"].label_counts["I-LOC"] == 2 * (pieces - 1)


def test_plain_tags_without_a_scheme_score_per_token():
    task, data = get("token_classification"), _data()
    rows = [{"tokens": ["the", "dog", "runs"], "ner_tags": ["DT", "NN", "VB"]}]
    task.check_labels(rows, data, "split 'train'")
    names = task.label_names(rows, data)
    assert names == ["DT", "NN", "VB"] and rows[0]["ner_tags"] == ["DT", "NN", "VB"]
    references = np.array([[IGNORE, 0, 1, 2, IGNORE], [IGNORE, 1, 1, IGNORE, IGNORE]])
    predictions = np.array([[2, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    for name in ("f1", "precision", "recall", "accuracy"):
        assert task.metric(name, predictions, references, 3, names=names) == pytest.approx(3 / 5)


def test_tags_are_padded_with_minus_100_in_batches_and_on_the_device():
    import torch
    from datasets import Dataset

    from ftcli.data.batching import DeviceTensors, collate

    rows = [{"input_ids": [101, 5, 6, 102], "attention_mask": [1] * 4, "labels": [IGNORE, 1, 2, IGNORE], "length": 4},
            {"input_ids": [101, 7, 102], "attention_mask": [1] * 3, "labels": [IGNORE, 0, IGNORE], "length": 3}]
    batch = collate(rows, pad_token_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 1, 2, IGNORE], [IGNORE, 0, IGNORE, IGNORE]]
    on_device = DeviceTensors(Dataset.from_list(rows), 0, torch.device("cpu"))
    short = on_device.batch(np.array([1]))
    assert short["labels"].tolist() == [[IGNORE, 0, IGNORE]] and short["input_ids"].shape == (1, 3)


def test_predictions_are_written_in_the_data_scheme_and_auto_says_what_it_found(caplog):
    from ftcli.tasks.token_classification import from_iob2, to_iob2

    rng = np.random.default_rng(0)
    for _ in range(500):  # every IOB2 sequence goes to each scheme and back unchanged
        tags, before = [], "O"
        for choice in rng.choice(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], size=rng.integers(1, 9)):
            tag = f"B-{choice[2:]}" if choice.startswith("I-") and before[2:] != choice[2:] else str(choice)
            tags.append(tag)
            before = tag
        for scheme in ("iob1", "iob2", "bioes"):
            assert to_iob2(from_iob2(tags, scheme), scheme) == tags
    sentence = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert from_iob2(sentence, "iob1") == ["I-PER", "I-PER", "B-PER", "O", "I-LOC"]
    assert from_iob2(sentence, "bioes") == ["B-PER", "E-PER", "S-PER", "O", "S-LOC"]
    task, names = get("token_classification"), ["O", "B-PER", "I-PER"]
    record = task.example_record(names, None, np.array([0, 1, 2, 0]), np.array([IGNORE, 1, 2, IGNORE]), 0.1, _data(tag_scheme="bioes"))
    assert record["gold"] == ["B-PER", "E-PER"] and record["prediction"] == ["B-PER", "E-PER"] and record["correct"]
    rows = [{"tokens": ["Jim", "Smith", "in", "Paris"], "ner_tags": ["S-PER", "O", "O", "S-LOC"]}]
    with caplog.at_level("WARNING", logger="ftcli"):
        task.check_labels(rows, _data(), "split 'train'")
    assert rows[0]["ner_tags"] == ["B-PER", "O", "O", "B-LOC"]
    assert "tags read as BIOES (data.tag_scheme: auto), converted to IOB2; set data.tag_scheme: bioes" in caplog.text
