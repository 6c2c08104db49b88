"""ftcli serve --workers 2: one real server of two processes behind one port, spoken to over several
connections. It is slow to start (the command and each worker import torch and load the model), so
the module starts one, for a tiny run trained once.

Both processes answer; /metrics counts every process's requests whichever process answers the
scrape; each process's queue is its own (full: 503 with Retry-After) and /metrics adds the queues
up; SIGTERM to the command answers the requests in flight in both processes, exits 0 and removes
the metrics' folder. The two tests share the server, in order: the second one stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import invoke, write_experiment
from test_serve import _free_port

FOUR = ["a lovely film", "an awful plot", "the cast was great", "boring"]  # --max-batch: no wait for company
WAIT_MS = 3000  # what fewer inputs wait for company: long enough to be in flight when SIGTERM comes


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    tmp: Path  # the server's TMPDIR, where its metrics' folder lives
    pinned: dict[int, list[httpx.Client]]  # per worker pid, clients whose connection that worker took


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("workers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_CACHE", str(root / "cache"))
        experiment = write_experiment(root, tiny_model_dir, train_size=32, eval_size=8, training={"epochs": 1})
        result = invoke("train", str(experiment))
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    port, log, tmp = _free_port(), folder / "serve.log", folder / "tmp"
    tmp.mkdir()
    command = [sys.executable, "-m", "ftcli", "serve", str(run), "--workers", "2", "--port", str(port),
               "--max-batch", "4", "--max-queue", "4", "--max-wait-ms", str(WAIT_MS)]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp)})
    pinned: dict[int, list[httpx.Client]] = {}
    try:
        _pin(port, pinned, process, log)
        yield Server(process, port, log, tmp, pinned)
    finally:
        for client in (client for clients in pinned.values() for client in clients):
            client.close()
        process.kill()
        process.wait()


def _pin(port: int, pinned: dict[int, list[httpx.Client]], process: subprocess.Popen, log: Path, per_worker: int = 2) -> None:
    """Open connections until each of the two workers, warmed up, has taken per_worker of them (the
    kernel hands a connection to whichever process accepts first). uvicorn closes a connection idle
    for 5 s, so every pinned one is asked again each round: still the same process."""
    deadline = time.monotonic() + 180
    while sum(len(clients) >= per_worker for clients in pinned.values()) < 2:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        for pid, clients in pinned.items():
            clients[:] = [client for client in clients if client.get("/v1/info").json()["pid"] == pid]
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        try:
            info = client.get("/v1/info").json()
        except httpx.TransportError:  # not listening yet
            info = {"ready": False}
        if info["ready"] and len(pinned.setdefault(info["pid"], [])) < per_worker:
            pinned[info["pid"]].append(client)
        else:
            client.close()
            time.sleep(0.05)
    assert len(pinned) == 2


def _metrics(client: httpx.Client) -> dict[str, float]:
    """/metrics as {sample with its labels: value}, and which process answered the scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    lines = [line.rsplit(" ", 1) for line in response.text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in lines} | {"pid": client.get("/v1/info").json()["pid"]}


def test_both_workers_answer_and_metrics_add_up_whichever_answers(server):
    _pin(server.port, server.pinned, server.process, server.log)
    (first, _), (second, _) = server.pinned.values()

    def send(client: httpx.Client, count: int) -> list[int]:
        return [client.post("/v1/predict", json={"inputs": FOUR}).status_code for _ in range(count)]

    with ThreadPoolExecutor(2) as pool:  # a connection to each worker, at once: never two requests in one queue
        answered = list(pool.map(send, (first, second), (5, 7)))
    for _ in range(6):  # and new connections, to whichever process takes each
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            answered.append(send(client, 1))
    assert [status for statuses in answered for status in statuses] == [200] * 18
    # Still each on its worker: both processes answered (5 and 7 of the 18).
    assert [client.get("/v1/info").json()["pid"] for client in (first, second)] == list(server.pinned)

    scrapes = [_metrics(client) for client in (first, second)]
    assert {scrape.pop("pid") for scrape in scrapes} == set(server.pinned)
    for scrape in scrapes:
        assert scrape['ftcli_requests_total{route="/v1/predict",status="200"}'] == 18
        assert scrape['ftcli_request_seconds_count{route="/v1/predict"}'] == 18
        assert scrape["ftcli_batch_size_sum"] == 4 * 18 and scrape["ftcli_batch_size_count"] == 18  # a batch a request
        assert scrape["ftcli_queue_inputs"] == 0
        assert not any(name.startswith("ftcli_request_errors_total") for name in scrape)


def test_each_worker_has_its_own_queue_and_sigterm_drains_both(server):
    _pin(server.port, server.pinned, server.process, server.log)
    (first, first_again), (second, second_again) = server.pinned.values()
    assert len(list(server.tmp.glob("ftcli-serve-metrics-*"))) == 1  # the metrics' folder, private to this server

    def post(client: httpx.Client, inputs: list[str]) -> tuple[int, float]:
        status = client.post("/v1/predict", json={"inputs": inputs}).status_code
        return status, time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(post, first, FOUR[:3])  # 3 of the first worker's 4, waiting for a fourth
        _wait_for_queue(second_again, 3)
        full = first_again.post("/v1/predict", json={"inputs": FOUR[:2]})
        assert full.status_code == 503 and full.headers["retry-after"] == "1" and "capacity" in full.json()["error"]
        other = pool.submit(post, second, FOUR[:2])  # the other worker's queue has room
        _wait_for_queue(second_again, 5)  # the two queues, added up
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        answers = [waiting.result(), other.result()]
    assert [status for status, _ in answers] == [200, 200]
    assert all(answered > signalled for _, answered in answers)  # they were in flight when SIGTERM came
    assert server.process.wait(timeout=60) == 0
    output = server.log.read_text()
    assert "stopped: every request in flight was answered" in output and "Traceback" not in output, output[-3000:]
    assert not list(server.tmp.iterdir())  # the metrics' folder is gone


def _wait_for_queue(client: httpx.Client, inputs: int) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while _metrics(client)["ftcli_queue_inputs"] != inputs:
        assert time.monotonic() < deadline, f"never {inputs} inputs queued"
        time.sleep(0.02)


def test_metrics_forget_the_queue_of_a_worker_that_died_and_keep_its_counts(tmp_path):
    """uvicorn starts another worker in a dead one's place: the inputs the dead one held no longer
    wait, but the requests it answered were answered."""
    from ftcli.serving.metrics import _forget_dead_processes

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"gauge_livesum_{dead.pid}.db", f"counter_{dead.pid}.db", f"histogram_{dead.pid}.db", f"gauge_livesum_{os.getpid()}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    _forget_dead_processes(str(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[1:])
