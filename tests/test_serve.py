"""ftcli serve: a real uvicorn server on a free local port, spoken to with a real HTTP client.

Answers equal ftcli predict's (pairs, single texts, regression, TEI's route), every bad request
gets its status and a JSON body, concurrent requests share forward passes and each gets its own
answer, the queue is bounded, the API key is checked, the ONNX engine agrees with PyTorch, and
SIGTERM drains the requests in flight before the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from conftest import invoke, regression_rows, sentiment_rows, write_rows

from ftcli.commands.predict import predict
from ftcli.commands.serve import ServeOptions, build_app
from ftcli.serving.engines import TorchEngine

PAIRS = [
    {"text": "the film was great and lovely", "text_pair": "a superb cast"},
    {"text": "an awful and boring story that went on and on", "text_pair": "poor"},
    {"text": "lovely", "text_pair": "the ending was dreadful and the script was poor"},
]
TEXTS = ["the plot was superb and excellent", "the show was awful and great and poor", "boring"]


def _train(root: Path, model_dir: Path, name: str, rows, fields: list[str], **sections) -> Path:
    data = root / name
    experiment = {
        "name": name, "output_dir": str(root / "runs"), "model": str(model_dir),
        "data": {"train": str(write_rows(data / "train.jsonl", rows(96, 1))),
                 "validation": str(write_rows(data / "validation.jsonl", rows(16, 2))),
                 "text_fields": fields, "max_length": 32},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 2, "save_every": 4, "precision": "fp32"},
    }
    for key, value in sections.items():
        experiment[key] = experiment[key] | value if isinstance(value, dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    result = invoke("train", str(path))
    assert result.exit_code == 0, result.output
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A sentence-pair classifier and a single-text regression run, trained once for the module."""
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_CACHE", str(root / "cache"))
        pair = _train(root, tiny_model_dir, "pairs", lambda n, seed: sentiment_rows(n, seed, pair=True), ["sentence1", "sentence2"])
        regression = _train(
            root, tiny_model_dir, "scores", regression_rows, ["text"], task="regression",
            data={"label_field": "score"},
        )
    return {"pair": pair, "regression": regression}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(run: Path, **options):
    """A real uvicorn server in a thread on a free port; yields an httpx client once /health is 200."""
    app = build_app(ServeOptions(str(run), **options))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        _wait_ready(client)
        yield client
    server.should_exit = True
    thread.join(timeout=30)
    listener.close()


def _wait_ready(client: httpx.Client, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the server never became ready")


@pytest.fixture(scope="module")
def pair_server(runs):
    with serving(runs["pair"], max_wait_ms=50, max_inputs=8, max_chars=400) as client:
        yield client


def _expected(run: Path, rows: list[dict], tmp_path: Path) -> list[dict]:
    """What ftcli predict gives for these rows, without the rows' own columns."""
    source = write_rows(tmp_path / "input.jsonl", rows)
    return [{key: value for key, value in row.items() if key not in rows[0]} for row in predict(run, source)]


def _assert_same(answers: list[dict], expected: list[dict]) -> None:
    assert len(answers) == len(expected)
    for answer, reference in zip(answers, expected):
        assert answer.keys() == reference.keys()
        for key, value in reference.items():
            if isinstance(value, dict):
                assert answer[key].keys() == value.keys()
                assert all(abs(answer[key][name] - value[name]) < 1e-5 for name in value)
            elif isinstance(value, float):
                assert abs(answer[key] - value) < 1e-5
            else:
                assert answer[key] == value


def test_answers_equal_ftcli_predict_for_pairs_and_tei_route(pair_server, runs, tmp_path):
    expected = _expected(runs["pair"], [{"sentence1": p["text"], "sentence2": p["text_pair"]} for p in PAIRS], tmp_path)
    many = pair_server.post("/v1/predict", json={"inputs": PAIRS})
    assert many.status_code == 200, many.text
    _assert_same(many.json()["predictions"], expected)
    one = pair_server.post("/v1/predict", json={"inputs": PAIRS[0]})
    _assert_same(one.json()["predictions"], expected[:1])
    named = pair_server.post("/v1/predict", json={"inputs": [{"sentence1": PAIRS[1]["text"], "sentence2": PAIRS[1]["text_pair"]}]})
    _assert_same(named.json()["predictions"], expected[1:2])

    # text-embeddings-inference: ["a", "b"] is one pair (a list of labels), [["a", "b"], ...] a batch.
    single = pair_server.post("/predict", json={"inputs": [PAIRS[0]["text"], PAIRS[0]["text_pair"]]}).json()
    assert [entry["label"] for entry in single] == sorted(expected[0]["probabilities"], key=lambda n: -expected[0]["probabilities"][n])
    assert all(abs(entry["score"] - expected[0]["probabilities"][entry["label"]]) < 1e-5 for entry in single)
    batch = pair_server.post("/predict", json={"inputs": [[p["text"], p["text_pair"]] for p in PAIRS], "truncate": True}).json()
    assert len(batch) == 3 and all(entry[0]["score"] >= entry[1]["score"] for entry in batch)
    assert {entry["label"]: round(entry["score"], 5) for entry in batch[2]} == {k: round(v, 5) for k, v in expected[2]["probabilities"].items()}
    raw = pair_server.post("/predict", json={"inputs": [PAIRS[0]["text"], PAIRS[0]["text_pair"]], "raw_scores": True}).json()
    assert sum(entry["score"] for entry in raw) != pytest.approx(1.0)  # logits, not probabilities

    info = pair_server.get("/v1/info").json()
    assert info["task"] == "single_label" and info["labels"] == ["0", "1"] and info["engine"] == "torch"
    assert info["cuda_graphs"] is (info["device"] == "cuda")  # the torch engine replays graphs on a GPU
    assert info["text_fields"] == ["sentence1", "sentence2"] and info["versions"]["ftcli"] and info["ready"] is True


def test_regression_run_answers_equal_ftcli_predict(runs, tmp_path):
    expected = _expected(runs["regression"], [{"text": text} for text in TEXTS], tmp_path)
    with serving(runs["regression"]) as client:
        answers = client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"]
        tei = client.post("/predict", json={"inputs": TEXTS[0]}).json()
        pair = client.post("/v1/predict", json={"inputs": {"text": "a", "text_pair": "b"}})
    _assert_same(answers, expected)
    assert list(answers[0]) == ["prediction"]
    assert tei == [{"label": tei[0]["label"], "score": pytest.approx(expected[0]["prediction"], abs=1e-5)}]
    assert pair.status_code == 422 and "single texts" in pair.json()["error"]


BAD_REQUESTS = [
    # (what, body bytes or JSON, route, status)
    ("invalid JSON", b'{"inputs": ', "/v1/predict", 400),
    ("invalid UTF-8", b'{"inputs": "caf\xe9"}', "/v1/predict", 400),
    ("a lone surrogate", b'{"inputs": {"text": "\\ud800", "text_pair": "b"}}', "/v1/predict", 400),
    ("not an object", [], "/v1/predict", 422),
    ("no inputs", {"input": "a"}, "/v1/predict", 422),
    ("unknown key", {"inputs": PAIRS[0], "top_k": 2}, "/v1/predict", 422),
    ("a number", {"inputs": 5}, "/v1/predict", 422),
    ("a text not a string", {"inputs": [{"text": 3, "text_pair": "b"}]}, "/v1/predict", 422),
    ("an empty list", {"inputs": []}, "/v1/predict", 422),
    ("no text_pair for a pair model", {"inputs": "only one text"}, "/v1/predict", 422),
    ("too many inputs", {"inputs": PAIRS * 3}, "/v1/predict", 413),
    ("too many characters", {"inputs": {"text": "a" * 401, "text_pair": "b"}}, "/v1/predict", 413),
    ("a body too large", {"inputs": "x" * (3 * 1024 * 1024)}, "/v1/predict", 413),
    ("tei: a batch of three texts", {"inputs": [["a", "b", "c"]]}, "/predict", 422),
    ("tei: a single text for a pair model", {"inputs": "one"}, "/predict", 422),
    ("tei: raw_scores not a boolean", {"inputs": ["a", "b"], "raw_scores": "yes"}, "/predict", 422),
    ("tei: too many tokens without truncate", {"inputs": ["great " * 60, "b"]}, "/predict", 413),
]


@pytest.mark.parametrize("what, body, route, status", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_each_bad_request_gets_its_status_and_a_json_error(pair_server, what, body, route, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = pair_server.post(route, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, (what, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error and "Traceback" not in response.text and 'File "' not in response.text


def test_unknown_routes_and_methods_answer_json(pair_server):
    assert pair_server.get("/nowhere").status_code == 404 and "error" in pair_server.get("/nowhere").json()
    wrong = pair_server.get("/v1/predict")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(pair_server, runs, tmp_path):
    inputs = [{"text": f"the film was {word} and {other}", "text_pair": f"a {other} cast"}
              for word in ("great", "awful", "lovely", "poor") for other in ("superb", "boring", "dreadful", "brilliant")]
    expected = _expected(runs["pair"], [{"sentence1": p["text"], "sentence2": p["text_pair"]} for p in inputs], tmp_path)
    before = _batch_histogram(pair_server.get("/metrics").text)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda item: pair_server.post("/v1/predict", json={"inputs": item}), inputs))
    assert all(answer.status_code == 200 for answer in answers)
    _assert_same([answer.json()["predictions"][0] for answer in answers], expected)
    count, total, singles = (after - earlier for after, earlier in zip(_batch_histogram(pair_server.get("/metrics").text), before))
    assert total == 16 and count < 16 and singles < count, (count, total, singles)  # some forward passes held several
    text = pair_server.get("/metrics").text
    assert 'ftcli_requests_total{route="/v1/predict",status="200"}' in text and "ftcli_request_seconds_bucket" in text


def _batch_histogram(text: str) -> tuple[float, float, float]:
    """(forward passes, inputs in them, passes of one input) from the Prometheus text."""
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("ftcli_batch_size")}
    return values["ftcli_batch_size_count"], values["ftcli_batch_size_sum"], values['ftcli_batch_size_bucket{le="1.0"}']


def test_full_queue_answers_503_and_a_gone_client_blocks_nothing(runs, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    gate.set()
    forward = TorchEngine.logits

    def held(engine, batch):  # the engine thread waits at the gate, so the queue fills behind it
        entered.set()
        assert gate.wait(30)
        return forward(engine, batch)

    monkeypatch.setattr(TorchEngine, "logits", held)
    with serving(runs["pair"], max_batch=4, max_queue=4) as client:  # the warm-up passed the open gate
        gate.clear()
        entered.clear()
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(client.post, "/v1/predict", json={"inputs": PAIRS[0]})
            assert entered.wait(30)
            waiting = pool.submit(client.post, "/v1/predict", json={"inputs": PAIRS})  # 3 of the queue's 4
            while "ftcli_queue_inputs 3.0" not in client.get("/metrics").text:
                time.sleep(0.01)
            full = client.post("/v1/predict", json={"inputs": PAIRS[:2]})
            assert full.status_code == 503 and full.headers["retry-after"] == "1" and "capacity" in full.json()["error"]
            gate.set()
            assert busy.result().status_code == 200 and waiting.result().status_code == 200
        too_many = client.post("/v1/predict", json={"inputs": PAIRS + PAIRS})
        assert too_many.status_code == 413
        gate.clear()
        with pytest.raises(httpx.TimeoutException):  # this client leaves before its answer
            client.post("/v1/predict", json={"inputs": PAIRS[1]}, timeout=0.1)
        gate.set()
        started = time.monotonic()
        assert client.post("/v1/predict", json={"inputs": PAIRS[2]}).status_code == 200
        assert time.monotonic() - started < 5


def test_a_failing_forward_pass_is_a_json_500_and_counted(pair_server, monkeypatch):
    def broken(engine, batch):
        raise RuntimeError("a broken kernel")

    monkeypatch.setattr(TorchEngine, "logits", broken)
    failed = pair_server.post("/v1/predict", json={"inputs": PAIRS[0]})
    assert failed.status_code == 500 and failed.json() == {"error": "internal error", "fix": "the server logged it; retry, or report it"}
    assert "kernel" not in failed.text
    assert 'ftcli_request_errors_total{route="/v1/predict",status="500"} 1.0' in pair_server.get("/metrics").text
    monkeypatch.undo()
    assert pair_server.post("/v1/predict", json={"inputs": PAIRS[0]}).status_code == 200  # the server goes on


def test_api_key_is_required_except_for_health(runs, monkeypatch):
    monkeypatch.setenv("FTCLI_API_KEY", "s3cret-key")
    with serving(runs["pair"]) as client:
        assert client.post("/v1/predict", json={"inputs": PAIRS[0]}).status_code == 401
        wrong = client.post("/v1/predict", json={"inputs": PAIRS[0]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "missing or wrong API key" and "s3cret" not in wrong.text
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200
        right = client.post("/v1/predict", json={"inputs": PAIRS[0]}, headers={"Authorization": "Bearer s3cret-key"})
        assert right.status_code == 200


def test_onnx_engine_answers_as_torch_does(runs, pair_server):
    assert invoke("export", str(runs["pair"])).exit_code == 0
    torch_answers = pair_server.post("/v1/predict", json={"inputs": PAIRS}).json()["predictions"]
    with serving(runs["pair"], engine="onnx") as client:
        onnx_answers = client.post("/v1/predict", json={"inputs": PAIRS}).json()["predictions"]
        assert client.get("/v1/info").json()["engine"] == "onnx"
    for ours, theirs in zip(onnx_answers, torch_answers):
        assert ours["predicted_label"] == theirs["predicted_label"]
        assert all(abs(ours["probabilities"][name] - p) < 1e-4 for name, p in theirs["probabilities"].items())
    missing = invoke("serve", str(runs["pair"]), "--engine", "onnx", "--quantized", "--port", str(_free_port()))
    assert missing.exit_code == 2 and "--quantize int8" in missing.output


def test_engine_auto_serves_a_current_export_on_a_cpu_and_torch_when_it_is_damaged(runs, caplog):
    assert invoke("export", str(runs["pair"])).exit_code == 0
    with serving(runs["pair"]) as client:  # auto, on a machine without a GPU
        assert client.get("/v1/info").json()["engine"] == "onnx"
    with serving(runs["pair"], engine="torch") as client:
        assert client.get("/v1/info").json()["engine"] == "torch"
    onnx_file = runs["pair"] / "export" / "model.onnx"
    whole = onnx_file.read_bytes()
    try:
        onnx_file.write_bytes(whole[: len(whole) // 2])  # a copy cut short
        with serving(runs["pair"]) as client:
            assert client.get("/v1/info").json()["engine"] == "torch"
        assert any("serving with torch" in record.message for record in caplog.records)
    finally:
        onnx_file.write_bytes(whole)


def test_sigterm_finishes_requests_in_flight_then_exits_0(runs):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ftcli", "serve", str(runs["pair"]), "--port", str(port), "--max-wait-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "FTCLI_API_KEY": "k"},
    )
    headers = {"Authorization": "Bearer k"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_ready(client)
            with ThreadPoolExecutor(3) as pool:
                flights = [pool.submit(client.post, "/v1/predict", json={"inputs": pair}, headers=headers) for pair in PAIRS]
                time.sleep(0.5)  # all three wait in the batcher, for up to 1.5 s
                server.send_signal(signal.SIGTERM)
                answers = [flight.result() for flight in flights]
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    output = server.stdout.read()
    assert "stopped: every request in flight was answered" in output and "k\n" not in output


def test_serve_without_its_packages_names_the_extra(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = invoke("serve", str(runs["pair"]))
    assert result.exit_code == 2 and "pip install 'ftcli[serve]'" in result.output


def test_the_listener_sends_small_responses_at_once():
    """TCP_NODELAY on the listening socket, which accepted connections inherit: without it each
    response's last small segment waits for the client's delayed ACK (40 ms a request, measured)."""
    from ftcli.commands.serve import _bind

    listener = _bind("127.0.0.1", 0)
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
        client.close()
    finally:
        listener.close()
