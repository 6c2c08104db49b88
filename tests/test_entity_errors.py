"""A tagger's analysis in its own terms: entity errors by kind (crafted tag sequences, then one
evaluate end to end), calibration fitted on the words, and report.html and the diagnosis speaking of
entities and entity types."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke
from test_token_classification import ner_config, ner_rows

from ftcli.objective import fit_temperature
from ftcli.reporting.diagnosis import diagnose
from ftcli.tasks import get
from ftcli.tasks.token_classification import IGNORE, TokenObjective, entities, entity_error_analysis, entity_errors, entity_scores

# ---------------------------------------------------------------- each kind, on crafted sequences


@pytest.mark.parametrize(
    "gold, predicted, expected",
    [
        (["B-per", "I-per", "O"], ["B-loc", "I-loc", "O"], [("wrong type", ("per", 0, 2), ("loc", 0, 2))]),
        (["O", "B-loc", "I-loc"], ["O", "O", "B-loc"], [("wrong boundary", ("loc", 1, 3), ("loc", 2, 3))]),
        (["B-per", "I-per", "O"], ["O", "B-loc", "I-loc"], [("wrong type and boundary", ("per", 0, 2), ("loc", 1, 3))]),
        (["O", "B-per", "O"], ["O", "O", "O"], [("missed", ("per", 1, 2), None)]),
        (["O", "O", "O"], ["B-loc", "O", "O"], [("spurious", None, ("loc", 0, 1))]),
        (["B-per", "O", "B-loc"], ["B-per", "O", "B-loc"], []),  # exactly right: no error
        # an I- that opens nothing is no entity (strict IOB2): predicting it is missing the gold one
        (["B-per", "O"], ["I-per", "O"], [("missed", ("per", 0, 1), None)]),
    ],
    ids=["wrong type", "wrong boundary", "both", "missed", "spurious", "right", "stray I-"],
)
def test_each_kind_of_entity_error(gold, predicted, expected):
    assert entity_errors(predicted, gold) == expected


def test_a_prediction_over_two_gold_entities_is_wrong_once_against_the_one_of_its_type():
    gold = ["B-per", "I-per", "B-loc", "O", "B-org"]
    predicted = ["B-loc", "I-loc", "I-loc", "O", "O"]
    assert entity_errors(predicted, gold) == [("wrong boundary", ("loc", 2, 3), ("loc", 0, 3)), ("missed", ("org", 4, 5), None)]


def test_the_errors_of_predicted_entities_number_the_false_positives_on_random_sequences():
    """Each predicted entity that is not exactly a gold one is one error: so they number
    predicted - right, which entity precision reads; missed ones are gold entities nothing touches."""
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-per", "I-per", "B-loc", "I-loc"]
    predicted = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    gold = [[rng.choice(tags) for _ in sentence] for sentence in predicted]
    errors = [error for found, true in zip(predicted, gold) for error in entity_errors(found, true)]
    found = sum(len(entities(sentence)) for sentence in predicted)
    right = round(entity_scores(predicted, gold)["micro"]["precision"] * found)
    assert sum(kind != "missed" for kind, _, _ in errors) == found - right
    untouched = sum(
        not any(span[1] < other[2] and other[1] < span[2] for other in entities(found_tags))
        for found_tags, true_tags in zip(predicted, gold) for span in entities(true_tags)
    )
    assert sum(kind == "missed" for kind, _, _ in errors) == untouched > 0


def test_the_analysis_counts_the_kinds_shows_one_of_each_first_and_tags_the_worst_sentences_word_by_word():
    # (word number, word) under each labelled piece: "Washington" is two pieces, both labelled.
    words = [
        [(0, "John"), (1, "Smith"), (2, "went"), (3, "to"), (4, "Washington"), (4, "Washington")],
        [(0, "Paris"), (1, "is"), (2, "nice")],
    ]
    gold = [["B-per", "I-per", "O", "O", "B-loc", "I-loc"], ["B-loc", "O", "O"]]
    predicted = [["B-per", "O", "O", "O", "B-per", "I-per"], ["B-loc", "O", "B-org"]]
    analysis = entity_error_analysis(predicted, gold, words)
    counts = {row["kind"]: row["count"] for row in analysis["entity_errors"]}
    assert counts == {"wrong type": 1, "wrong boundary": 1, "wrong type and boundary": 0, "missed": 0, "spurious": 1}
    assert [row["share"] for row in analysis["entity_errors"]] == pytest.approx([1 / 3, 1 / 3, 0, 0, 1 / 3])
    assert [entry["kind"] for entry in analysis["error_examples"]] == ["wrong type", "wrong boundary", "spurious"]
    assert analysis["error_examples"][0] == {"index": 0, "kind": "wrong type", "gold": "Washington (loc)", "predicted": "Washington (per)"}
    assert analysis["error_examples"][1] == {"index": 0, "kind": "wrong boundary", "gold": "John Smith (per)", "predicted": "John (per)"}
    assert analysis["error_examples"][2]["gold"] == "-" and analysis["error_examples"][2]["predicted"] == "nice (org)"
    assert analysis["worst_sentences"] == [
        {"index": 0, "errors": 2, "text": "John[B-per] Smith[I-per→O] went to Washington[B-loc→B-per]"},
        {"index": 1, "errors": 1, "text": "Paris[B-loc] is nice[O→B-org]"},
    ]


def test_plain_tags_have_no_entity_errors():
    names = ["ADJ", "NOUN", "VERB"]
    labels, decisions = np.array([[IGNORE, 0, 1, 2, IGNORE]]), np.array([[0, 0, 2, 2, 0]])
    analysis = get("token_classification").analyse(names, np.zeros((1, 5, 3)), decisions, labels, np.array([0.5]))
    assert "entity_errors" not in analysis and analysis["highest_loss"] == [{"index": 0, "loss": 0.5}]


# ---------------------------------------------------------------- calibration on the words


def test_the_temperature_is_fitted_on_the_labelled_pieces_only():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(400, 12, 5, generator=generator)
    labels = torch.multinomial(torch.softmax(true_logits, -1).reshape(-1, 5), 1, generator=generator).reshape(400, 12)
    labels[:, ::3] = IGNORE  # special tokens and later pieces carry no label ...
    logits = true_logits * 3
    logits[labels == IGNORE] *= 40  # ... and their logits, however sharp, must not move the fit
    scorer, pairs, pair_labels = TokenObjective().calibration_pairs(logits, labels)
    assert pairs.shape == (400 * 8, 5) and pair_labels.shape == (400 * 8,) and scorer.task == "single_label"
    assert fit_temperature(scorer, pairs, pair_labels) == pytest.approx(3.0, rel=0.08)


# ---------------------------------------------------------------- end to end: a tagger that still errs


@pytest.fixture(scope="module")
def weak_tagger(tmp_path_factory, tiny_model_dir):
    """A tagger trained one epoch only (entity F1 about 0.3: it misses many entities), evaluated and reported."""
    root = tmp_path_factory.mktemp("weak-tagger")
    path = ner_config(root, tiny_model_dir, "loop")
    config = yaml.safe_load(path.read_text())
    config["training"] |= {"epochs": 1, "logging_steps": 2, "eval_every": 4, "save_every": 4}
    path.write_text(yaml.safe_dump(config))
    trained = invoke("train", str(path))
    assert trained.exit_code == 0, trained.output
    run = root / "runs" / "ner-loop"
    evaluated = invoke("evaluate", str(run))
    assert evaluated.exit_code == 0, evaluated.output
    reported = invoke("report", str(run), "--html")
    assert reported.exit_code == 0, reported.output
    return run, evaluated.output, reported.output


@pytest.mark.slow  # its file's trainings: run first (conftest)
def test_evaluate_counts_entity_errors_as_the_predictions_show_them(weak_tagger):
    run, output, _ = weak_tagger
    errors = json.loads((run / "eval_validation.json").read_text())["errors"]
    counts = {row["kind"]: row["count"] for row in errors["entity_errors"]}
    lines = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    found = [set(entities(line["prediction"])) for line in lines]
    true = [set(entities(line["gold"])) for line in lines]
    assert sum(counts.values()) - counts["missed"] == sum(len(f - t) for f, t in zip(found, true)) > 0
    assert counts["missed"] > 0
    worst = errors["worst_sentences"][0]
    assert worst["errors"] == max(len(entity_errors(line["prediction"], line["gold"])) for line in lines)
    words = lines[worst["index"]]["tokens"]
    assert [word.partition("[")[0] for word in worst["text"].split()] == words and "→" in worst["text"]
    example = errors["error_examples"][0]
    assert example["text"] == " ".join(lines[example["index"]]["tokens"]) and example["gold"].endswith(")")
    for shown in ("per entity type", "entity errors by kind", "entity errors, an example of each kind", "sentences with the most entity errors"):
        assert shown in output


def test_a_tagger_is_calibrated_on_its_words_and_keeps_its_tags(weak_tagger, tiny_model_dir):
    from safetensors.torch import load_file

    run, output, _ = weak_tagger
    record = json.loads((run / "model" / "calibration.json").read_text())
    assert record["after"]["ece"] < record["before"]["ece"] and record["after"]["log_loss"] < record["before"]["log_loss"]
    words = sum(len(row["tokens"]) for row in ner_rows(40, seed=2))  # every word's first piece is labelled (max_length 32 cuts none)
    assert sum(record["before"]["reliability"]["count"]) == words
    best = json.loads((run / "metrics.json").read_text())["train"]["best_checkpoint"]
    kept, trained = load_file(run / "model" / "model.safetensors"), load_file(f"{best}/model.safetensors")
    assert torch.allclose(kept["classifier.weight"] * record["temperature"], trained["classifier.weight"], atol=1e-6)
    evaluated = json.loads((run / "eval_validation.json").read_text())["calibration"]
    assert evaluated["temperature"] == record["temperature"] and evaluated["after"]["ece"] < evaluated["before"]["ece"]
    assert "calibration (temperature" in output


def test_the_report_reads_entity_scores_and_names_entity_types(weak_tagger):
    run, _, output = weak_tagger
    findings = json.loads((run / "diagnosis.json").read_text())["findings"]
    missed = next(finding for finding in findings if finding["summary"].startswith("Missed entities"))
    assert missed["verdict"] == "weak_spots" and missed["evidence"]["recall"] < missed["evidence"]["precision"]
    assert "Missed entities: entity recall" in output
    page = (run / "report.html").read_text()
    assert 'alt="F1 per entity type"' in page and "Entity errors by kind" in page and "Sentences with the most entity errors" in page
    assert 'alt="confusion matrix"' not in page  # a matrix of word tags, mostly O: the entity errors replace it
    assert "Calibration (temperature" in page


def test_the_diagnosis_says_which_way_a_tagger_errs_and_which_types_it_never_finds():
    events = [{"step": step, "train_loss": 1.0 / step} for step in range(1, 9)]
    config = {"task": "token_classification", "training": {"class_weights": "balanced"}}
    per_type = [
        {"label": "person", "precision": 0.5, "recall": 0.9, "f1": 0.64, "support": 30},
        {"label": "misc", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 4},
        {"label": "micro", "precision": 0.45, "recall": 0.8, "f1": 0.58, "support": 34},
    ]
    kinds = [{"kind": kind, "count": count, "share": 0.0} for kind, count in (("wrong type", 1), ("wrong boundary", 6), ("wrong type and boundary", 0), ("missed", 2), ("spurious", 12))]
    validation = {"precision": 0.45, "recall": 0.8, "f1": 0.58, "errors": {"per_class": per_type, "entity_errors": kinds}}
    diagnosis = diagnose(events, None, config, None, validation)
    summaries = [finding.summary for finding in diagnosis.findings if finding.verdict == "weak_spots"]
    assert diagnosis.verdict == "weak_spots" and len(summaries) == 2
    assert summaries[0].startswith("Spurious entities: entity precision 0.450 is far below recall 0.800")
    assert "12 predicted entities overlap no gold one and 6 have the wrong boundaries" in summaries[0]
    assert summaries[1].startswith("Types never found: no misc entity")
    # Close precision and recall, every type found: nothing beyond the curves; other tasks: never.
    balanced = {"precision": 0.8, "recall": 0.75, "f1": 0.77, "errors": {"per_class": per_type[:1]}}
    assert all(finding.verdict != "weak_spots" for finding in diagnose(events, None, config, None, balanced).findings)
    single = diagnose(events, None, {"task": "single_label"}, None, validation)
    assert all(finding.verdict != "weak_spots" for finding in single.findings)
