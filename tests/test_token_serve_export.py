"""token_classification through ftcli serve, ftcli export and ftcli push, on one tiny tagger.

The server answers each text's entities exactly as ftcli predict does (a real uvicorn server and
a real HTTP client, concurrent requests batched), the routes that do not apply say so in JSON,
the ONNX export keeps logits per token within the parity tolerance, its int8 model is judged on
entity F1, both engines give the same entities, and push writes a card for a tagger.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import invoke, write_rows
from test_push import hub_online  # noqa: F401 (a fixture)
from test_serve import _batch_histogram, serving
from test_token_classification import _byte_level_tokenizer, _data, ner_config

from ftcli.commands.predict import predict

TEXTS = [
    "then John Smith went to   Paris today",
    "Mary saw Tokyo",
    "the friends went home later",  # no entity
    "a Lucy and Peter Brown went to New York with friends then London",
]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, tiny_model_dir) -> Path:
    """One tagger of names and places, trained once for the module."""
    root = tmp_path_factory.mktemp("tagger")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_CACHE", str(root / "cache"))
        result = invoke("train", str(ner_config(root, tiny_model_dir, "loop")))
    assert result.exit_code == 0, result.output
    return root / "runs" / "ner-loop"


@pytest.fixture(scope="module")
def expected(tagger, tmp_path_factory) -> list[dict]:
    """ftcli predict's entities for TEXTS, with PyTorch (before any export exists)."""
    source = write_rows(tmp_path_factory.mktemp("inputs") / "texts.jsonl", [{"tokens": text} for text in TEXTS])
    return [{"entities": row["entities"]} for row in predict(tagger, source, engine="torch")]


@pytest.fixture(scope="module")
def exported(tagger, expected) -> dict:
    """The run exported with its int8 model: export/report.json."""
    result = invoke("export", str(tagger), "--quantize", "int8")
    assert result.exit_code == 0, result.output
    return json.loads((tagger / "export" / "report.json").read_text())


def _same_entities(ours: list[dict], theirs: list[dict], tolerance: float = 1e-5) -> None:
    assert len(ours) == len(theirs)
    for answer, reference in zip(ours, theirs):
        assert [{k: v for k, v in e.items() if k != "score"} for e in answer["entities"]] == [
            {k: v for k, v in e.items() if k != "score"} for e in reference["entities"]
        ]
        assert [e["score"] for e in answer["entities"]] == pytest.approx([e["score"] for e in reference["entities"]], abs=tolerance)


def test_the_server_answers_the_entities_ftcli_predict_gives(tagger, expected):
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in expected[0]["entities"]] == [
        ("person", "John Smith", 5, 15), ("location", "Paris", 26, 31)
    ]  # learned, with characters of the text as given
    with serving(tagger, max_wait_ms=50) as client:
        many = client.post("/v1/predict", json={"inputs": TEXTS})
        assert many.status_code == 200, many.text
        _same_entities(many.json()["predictions"], expected)
        one = client.post("/v1/predict", json={"inputs": {"text": TEXTS[1]}}).json()["predictions"]
        named = client.post("/v1/predict", json={"inputs": [{"tokens": TEXTS[3]}]}).json()["predictions"]
        _same_entities(one + named, [expected[1], expected[3]])

        tei = client.post("/predict", json={"inputs": TEXTS[0]})
        assert tei.status_code == 422 and "tags words" in tei.json()["error"] and "/v1/predict" in tei.json()["fix"]
        words = client.post("/v1/predict", json={"inputs": [{"tokens": ["John", "Smith"]}]})
        assert words.status_code == 422 and "not a string" in words.json()["error"]
        pair = client.post("/v1/predict", json={"inputs": {"text": "a", "text_pair": "b"}})
        assert pair.status_code == 422 and "single texts" in pair.json()["error"]
        for refused in (tei, words, pair):
            assert refused.headers["content-type"] == "application/json" and "Traceback" not in refused.text

        info = client.get("/v1/info").json()
        assert info["task"] == "token_classification" and info["text_fields"] == ["tokens"] and info["engine"] == "torch"
        assert info["labels"] == ["O", "B-location", "I-location", "B-person", "I-person"] and info["thresholds"] is None
        assert client.get("/v1/health").json() == {"status": "ok"}
        metrics = client.get("/metrics").text
        assert 'ftcli_requests_total{route="/v1/predict",status="200"} 3.0' in metrics
        assert 'ftcli_requests_total{route="/predict",status="422"} 1.0' in metrics


def test_the_server_copies_a_byte_level_tokenizer_once_and_cuts_the_words_predict_cuts():
    from ftcli.data.prepare import prefix_spaced, word_columns
    from ftcli.data.words import split_words

    tokenizer = _byte_level_tokenizer()
    spaced = prefix_spaced(tokenizer)  # as load_served makes it
    assert spaced is not tokenizer and prefix_spaced(spaced) is spaced  # no copy at each request
    texts = ["John  Smith went", "  Paris, today!", "é café\tnaïve\nthen", "x", "中文 字 😀 it's"]
    assert [split_words(text, spaced) for text in texts] == [split_words(text, tokenizer) for text in texts]
    rows = [{"tokens": text} for text in texts]
    assert word_columns(rows, _data(), spaced) == word_columns(rows, _data(), tokenizer)


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_entities(tagger, expected):
    inputs = TEXTS * 4  # four lengths: rows padded together in one pass, each answered with its own
    with serving(tagger, max_wait_ms=200) as client:
        with ThreadPoolExecutor(len(inputs)) as pool:
            answers = list(pool.map(lambda text: client.post("/v1/predict", json={"inputs": text}), inputs))
        passes, total, _ = _batch_histogram(client.get("/metrics").text)
    assert all(answer.status_code == 200 for answer in answers)
    _same_entities([answer.json()["predictions"][0] for answer in answers], expected * 4)
    assert total == len(inputs) and passes < len(inputs), (passes, total)  # some passes held several requests


@pytest.mark.slow  # its file's trainings: run first (conftest)
def test_export_keeps_logits_per_token_and_judges_int8_on_entity_f1(tagger, exported):
    import onnxruntime

    parity = exported["parity"]
    assert parity["passed"] and parity["max_difference"] <= parity["atol"] and parity["split"] == "validation"
    session = onnxruntime.InferenceSession(str(tagger / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()[0].shape) == 3  # (batch, sequence, tags)
    gate = exported["quantization"]
    validation = json.loads((tagger / "metrics.json").read_text())["validation"]
    assert gate["metric"] == "f1" and gate["split"] == "validation"
    assert gate["fp32"] == pytest.approx(validation["f1"], abs=1e-9) and gate["fp32"] > 0.8  # entity F1, as evaluate scores it
    assert gate["kept"] == (gate["drop"] <= gate["max_drop"]) == (tagger / "export" / "model.int8.onnx").is_file()


def test_the_int8_gate_scores_entity_f1_as_evaluate_does_not_token_accuracy(tagger, exported):
    """The tagger is perfect on validation (F1 = accuracy = 1): on gold tags whose B-person became
    I-person (no person entity in strict IOB2), entity F1 and token accuracy part ways."""
    from ftcli.commands.export import onnx_metric
    from ftcli.data.prepare import prepare
    from ftcli.inference import evaluate_dataset
    from ftcli.runs.loading import load_run
    from ftcli.runtime import Runtime

    loaded = load_run(tagger)
    names = [loaded.model.config.id2label[index] for index in range(loaded.model.config.num_labels)]
    begin, inside = names.index("B-person"), names.index("I-person")
    validation = prepare(loaded.config.data, loaded.tokenizer, loaded.config.task).splits["validation"]
    harder = validation.map(lambda row: {"labels": [inside if tag == begin else tag for tag in row["labels"]]})
    torch_scores = evaluate_dataset(loaded.model, harder, loaded.config.metrics, 8, loaded.tokenizer.pad_token_id, Runtime.resolve("fp32"), loaded.objective)
    assert torch_scores["f1"] < torch_scores["accuracy"] - 0.1, torch_scores
    assert onnx_metric(tagger / "export" / "model.onnx", harder, loaded, "f1") == pytest.approx(torch_scores["f1"], abs=1e-9)


def test_onnx_engine_gives_the_entities_torch_gives_in_predict_and_serve(tagger, expected, exported, tmp_path):
    source = write_rows(tmp_path / "texts.jsonl", [{"tokens": text} for text in TEXTS])
    _same_entities([{"entities": row["entities"]} for row in predict(tagger, source, engine="onnx")], expected, 1e-4)
    result = invoke("predict", str(tagger), "--engine", "onnx", "--text", TEXTS[0])
    assert result.exit_code == 0, result.output
    _same_entities([json.loads(line) for line in result.output.splitlines() if line.startswith("{")], expected[:1], 1e-4)
    with serving(tagger, engine="onnx") as client:
        assert client.get("/v1/info").json()["engine"] == "onnx"
        _same_entities(client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"], expected, 1e-4)
    if exported["quantization"]["kept"]:
        with serving(tagger, engine="onnx", quantized=True) as client:
            answers = client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"]
        assert [[e["entity_group"] for e in a["entities"]] for a in answers] == [[e["entity_group"] for e in r["entities"]] for r in expected]


def test_push_uploads_a_tagger_with_a_token_classification_card(tagger, hub_online):  # noqa: F811
    result = invoke("push", str(tagger), "someone/tagger")
    assert result.exit_code == 0, result.output
    (_, _), (_, upload) = hub_online.calls
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "curves.png"} <= set(upload["files"])
    card = upload["files"]["README.md"].decode()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["pipeline_tag"] == "token-classification" and "token-classification" in front_matter["tags"]
    results = front_matter["model-index"][0]["results"]
    assert {result["task"]["type"] for result in results} == {"token-classification"}
    assert "A token classifier (named entities)" in card and "5 tags" in card
    assert 'pipeline("token-classification", model="someone/tagger", aggregation_strategy="simple")' in card
    assert "text-classification" not in card
