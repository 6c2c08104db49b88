"""ftcli serve speaks text-embeddings-inference's classifier API: a real uvicorn server, spoken to
with huggingface_hub's InferenceClient itself and with plain HTTP.

TEI's request shapes at /predict, POST / and POST /invocations (keys it does not know ignored, as
TEI's serde ignores them; ftcli's own /v1/predict still refuses them), its answer shapes, its
truncation options, and its /info and /health, with ftcli's /v1/info and /v1/health beside them.
"""

from __future__ import annotations

import threading
import time

import httpx
import huggingface_hub.constants
import pytest
import test_serve
from conftest import sentiment_rows
from huggingface_hub import InferenceClient
from test_serve import _expected, _train, serving

import ftcli
from ftcli.serving import app as app_module

KEY = "tei-test-key"
TEXTS = ["the plot was superb and lovely", "an awful and boring script", "the cast"]
# 30 tokens fit data.max_length=32 with [CLS] and [SEP]: right truncation keeps only the first
# word, left truncation only the last.
HEAD, TAIL = "awful " * 40, "great " * 40
TEI_INFO_KEYS = [
    "model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
    "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate",
    "tokenization_workers", "version", "sha", "docker_label",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A single-text sentiment classifier (labels negative, positive), trained once for the module."""
    root = tmp_path_factory.mktemp("tei")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_CACHE", str(root / "cache"))
        return _train(root, tiny_model_dir, "sentiment", sentiment_rows, ["text"])


@pytest.fixture(scope="module")
def server(run):
    """One server for the module, behind an API key (as a deployed TEI often is)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_API_KEY", KEY)
        with serving(run, max_inputs=8) as client:
            client.headers["Authorization"] = f"Bearer {KEY}"
            yield client


def test_inference_client_text_classification_answers_as_ftcli_predict(server, run, tmp_path, monkeypatch):
    expected = _expected(run, [{"text": TEXTS[0]}], tmp_path)[0]
    # Offline mode (conftest's) blocks every request of the client's session, even to 127.0.0.1;
    # given a URL, the client asks the Hub nothing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=str(server.base_url), api_key=KEY)
    # It posts {"inputs": text, "parameters": {...}} to the base URL, and reads element [0] of the
    # answer: TEI answers one text with a flat list, highest score first, so the client gets the
    # top label (against TEI too); top_k goes in "parameters", which TEI ignores.
    for answer in (client.text_classification(TEXTS[0]), client.text_classification(TEXTS[0], top_k=2)):
        assert answer.label == expected["predicted_label"]
        assert answer.score == pytest.approx(expected["probabilities"][answer.label], abs=1e-5)
    metrics = server.get("/metrics").text
    assert 'ftcli_requests_total{route="/",status="200"} 2.0' in metrics

    # The whole answer, as TEI gives it: every label, equal to ftcli predict's probabilities.
    full = server.post("/", json={"inputs": TEXTS[0], "parameters": {"top_k": 2}}).json()
    assert [entry["label"] for entry in full] == sorted(expected["probabilities"], key=lambda name: -expected["probabilities"][name])
    assert all(entry["score"] == pytest.approx(expected["probabilities"][entry["label"]], abs=1e-5) for entry in full)


def test_tei_routes_ignore_unknown_keys_and_v1_predict_refuses_them(server, run, tmp_path):
    expected = _expected(run, [{"text": text} for text in TEXTS], tmp_path)
    plain = server.post("/predict", json={"inputs": TEXTS[0]}).json()
    extra = {"parameters": {"top_k": 1, "function_to_apply": "none"}, "normalize": True, "model": "x"}
    for route in ("/predict", "/", "/invocations"):
        answer = server.post(route, json={"inputs": TEXTS[0], **extra})
        assert answer.status_code == 200, (route, answer.text)
        assert answer.json() == plain
    strict = server.post("/v1/predict", json={"inputs": TEXTS[0], "parameters": {}})
    assert strict.status_code == 422 and "'parameters'" in strict.json()["error"]

    # Shapes: ["a"] is one input (a flat list), [["a"], ["b"]] a batch (a list per input).
    assert server.post("/predict", json={"inputs": [TEXTS[0]]}).json() == plain
    batch = server.post("/predict", json={"inputs": [[text] for text in TEXTS], "truncate": None}).json()
    assert len(batch) == len(TEXTS) and [entry["label"] for entry in batch[0]] == [entry["label"] for entry in plain]
    for answer, reference in zip(batch, expected):
        assert {entry["label"]: entry["score"] for entry in answer} == pytest.approx(reference["probabilities"], abs=1e-5)


def test_truncation_direction_left_keeps_the_end(server):
    def scores(body: dict) -> httpx.Response:
        return server.post("/predict", json={"truncate": True, **body})

    right = scores({"inputs": HEAD + TAIL}).json()
    assert scores({"inputs": HEAD + TAIL, "truncation_direction": "right"}).json() == right
    assert right == scores({"inputs": HEAD}).json()
    for direction in ("left", "Left"):
        left = scores({"inputs": HEAD + TAIL, "truncation_direction": direction}).json()
        assert left == scores({"inputs": TAIL}).json() and left != right
    # The direction of one request leaves the next one's alone (each tokenizer thread's own copy).
    assert scores({"inputs": HEAD + TAIL}).json() == right
    for direction in ("LEFT", None, 3):
        refused = scores({"inputs": TEXTS[0], "truncation_direction": direction})
        assert refused.status_code == 422 and "truncation_direction" in refused.json()["error"]
    too_long = server.post("/predict", json={"inputs": HEAD + TAIL, "truncate": None})  # /info's auto_truncate: false
    assert too_long.status_code == 413 and "truncate" in too_long.json()["fix"]


def test_info_and_health_as_tei_answers_them(server, run):
    info = server.get("/info").json()
    assert list(info) == TEI_INFO_KEYS
    assert info["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}}
    assert info["model_id"] == info["served_model_name"] == run.name and info["model_sha"] is None
    assert info["model_dtype"] == "float32" and info["version"] == ftcli.__version__
    ours = server.get("/v1/info").json()
    assert info["max_input_length"] == ours["max_length"] == 32
    assert info["max_client_batch_size"] == ours["max_inputs"] == 8
    assert (info["max_batch_requests"], info["max_batch_tokens"], info["max_concurrent_requests"]) == (
        ours["max_batch"], ours["max_batch_tokens"], ours["max_queue"])
    assert info["auto_truncate"] is False and info["tokenization_workers"] >= 1

    with httpx.Client(base_url=server.base_url) as anonymous:  # no key: the probes answer, nothing else
        for probe in ("/health", "/", "/ping"):
            answer = anonymous.get(probe)
            assert answer.status_code == 200 and answer.content == b"", probe
        assert anonymous.get("/v1/health").json() == {"status": "ok"}
        assert anonymous.get("/info").status_code == 401
        assert anonymous.post("/", json={"inputs": TEXTS[0]}).status_code == 401


def test_health_is_503_until_warmed_up(run, monkeypatch):
    gate, real_warm_up, real_wait = threading.Event(), app_module.warm_up, test_serve._wait_ready
    seen: dict[str, httpx.Response] = {}

    def held_warm_up(batcher, sample) -> None:
        gate.wait(30)
        real_warm_up(batcher, sample)

    def look_then_release(client: httpx.Client) -> None:  # serving()'s wait for /health: look while warming
        while "health" not in seen:
            try:
                seen["health"] = client.get("/health")
            except httpx.TransportError:  # not listening yet
                time.sleep(0.05)
        seen["v1"], seen["info"] = client.get("/v1/health"), client.get("/info")
        gate.set()
        real_wait(client)

    monkeypatch.delenv("FTCLI_API_KEY", raising=False)  # the module's server's, still set
    monkeypatch.setattr(app_module, "warm_up", held_warm_up)
    monkeypatch.setattr(test_serve, "_wait_ready", look_then_release)
    with serving(run) as client:
        assert client.get("/health").status_code == 200
    assert seen["health"].status_code == 503 and seen["health"].headers["retry-after"] == "1"
    assert seen["v1"].status_code == 503 and seen["v1"].json() == {"status": "loading"}
    assert seen["info"].status_code == 200 and seen["info"].json()["model_id"] == run.name
