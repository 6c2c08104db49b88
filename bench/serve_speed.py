"""Serving speed side by side: the FastAPI handler users write around transformers.pipeline vs
ftcli serve (torch engine, and ONNX int8), on the same model and MRPC validation pairs, in one run.

    python -m bench.serve_speed                      # trains a short MiniLM MRPC run first
    python -m bench.serve_speed --run runs/mrpc-minilm --seconds 10 --clients 1,8,32
    git archive REF | tar -x -C /tmp/before          # ftcli as it was at REF, as one more row:
    python -m bench.serve_speed --run RUN --servers baseline,before,torch --before /tmp/before --rounds 3

Every server process is started first and left idle while another is driven; then each client
count drives each server in turn (baseline, then the others), --rounds times, so that every row
sees the same machine (a shared machine's load drifts over minutes). A row pools its rounds'
requests. Driving: --clients concurrent clients on this machine over loopback (asyncio + httpx,
one pair per request, each client sending its next request when its last is answered), spread
over --client-processes processes, for --seconds, after a 1 s warm-up; the clients' CPU use is
reported (cores busy) to show they were not the limit. The rows (--servers picks them):
  (a) baseline      FastAPI, a sync `def` route calling pipeline("text-classification") once per
                    request, as its tutorials write it (fp32, the default threads)
  (b) ftcli torch   ftcli serve RUN: batching, the run's precision
      ftcli before  the same command from the ftcli source at --before (to measure a change)
  (c) ftcli int8    ftcli serve RUN --engine onnx --quantized (ftcli export --quantize int8)
      ftcli torch, N workers   ftcli serve RUN --workers N (workers2, workers4): N front-end processes
Reported per row: requests/s, p50/p95/p99 latency, errors (non-200 answers and failed requests),
and the throughput and p50 latency ratios to (a) at the same number of clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from bench.train_speed import MRPC

ROOT = Path(__file__).resolve().parents[1]
WARM_UP_SECONDS = 1.0


class Pair(BaseModel):
    text: str
    text_pair: str


def baseline_app(model_dir: str):
    """What a user writes: one pipeline call per request, in FastAPI's thread pool (on the GPU
    where there is one, as the tutorials write it)."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    classifier = pipeline("text-classification", model=model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    app = FastAPI()

    @app.post("/predict")
    def predict(pair: Pair) -> dict:
        return classifier({"text": pair.text, "text_pair": pair.text_pair})

    return app


def train_run(workdir: Path, steps: int) -> Path:
    """A short MiniLM MRPC run: serving speed does not depend on how long it trained."""
    command = [
        sys.executable, "-m", "ftcli", "train", str(ROOT / "configs" / "mrpc-minilm.yaml"), "--set", "name=serve-bench",
        "--set", f"output_dir={workdir}", "--set", f"training.max_steps={steps}", "--set", f"training.eval_every={steps}",
        "--set", f"training.save_every={steps}", "--set", "data.test=null",
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return workdir / "serve-bench"


def export_int8(run: Path) -> dict:
    """ftcli export --quantize int8 with the default gate; when int8 is not kept, again with no
    gate so that row (c) can still be measured (the report says so)."""
    base = [sys.executable, "-m", "ftcli", "export", str(run), "--quantize", "int8"]
    subprocess.run(base, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((run / "export" / "report.json").read_text())["quantization"]
    if not report["kept"]:
        subprocess.run(base + ["--max-drop", "1"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report["kept_for_bench_only"] = True
    return report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVERS = {
    "baseline": "baseline", "torch": "ftcli torch", "before": "ftcli before", "int8": "ftcli int8",
    "workers2": "ftcli torch, 2 workers", "workers4": "ftcli torch, 4 workers",
}
# ftcli serve's options for each ftcli row beyond its defaults
SERVE_OPTIONS = {
    "ftcli int8": ["--engine", "onnx", "--quantized"],
    "ftcli torch, 2 workers": ["--workers", "2"],
    "ftcli torch, 4 workers": ["--workers", "4"],
}


def start_server(kind: str, run: Path, port: int, before: Path | None) -> subprocess.Popen:
    if kind == "baseline":
        command = [sys.executable, "-m", "bench.serve_speed", "--baseline-server", str(run / "model"), "--port", str(port)]
    else:
        command = [sys.executable, "-m", "ftcli", "serve", str(run.resolve()), "--port", str(port), *SERVE_OPTIONS.get(kind, [])]
    # python -m puts the working directory first on the path: the source it runs is the folder's
    folder = before if kind == "ftcli before" else ROOT
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{kind.replace(' ', '-')}-", suffix=".log", delete=False)
    server = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    server.log_path = log.name  # type: ignore[attr-defined]  # shown when the server never answers
    return server


async def wait_ready(client, url: str, seconds: float = 300, server: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (server is None or server.poll() is None):
        try:
            if (await client.post(url, json=_body(url, PAIRS[0]))).status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never answered")


async def ready(url: str, server: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        await wait_ready(client, url, server=server)


def _body(url: str, pair: tuple[str, str]) -> dict:
    text = {"text": pair[0], "text_pair": pair[1]}
    return {"inputs": text} if url.endswith("/v1/predict") else text


async def drive(url: str, clients: int, seconds: float, start_at: float) -> dict:
    """clients concurrent closed-loop clients for `seconds` after a warm-up that starts at the
    wall-clock time start_at (so that several client processes run at once): latencies, errors,
    and this process's CPU seconds meanwhile."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await wait_ready(client, url)
        await asyncio.sleep(max(start_at - time.time(), 0))
        latencies: list[float] = []
        errors = 0
        cpu_before, start = time.process_time(), time.perf_counter()
        measure_from, stop_at = start + WARM_UP_SECONDS, start + WARM_UP_SECONDS + seconds

        async def one_client(index: int) -> None:
            nonlocal errors
            position = index * 7
            while (now := time.perf_counter()) < stop_at:
                pair = PAIRS[position % len(PAIRS)]
                position += 1
                try:
                    ok = (await client.post(url, json=_body(url, pair))).status_code == 200
                except Exception:
                    ok = False
                done = time.perf_counter()
                if now < measure_from:
                    continue
                if ok:
                    latencies.append(done - now)
                else:
                    errors += 1

        await asyncio.gather(*(one_client(index) for index in range(clients)))
        cpu = time.process_time() - cpu_before
    return {"latencies": latencies, "errors": errors, "seconds": seconds, "client_cpu_seconds": cpu}


def _drive_in_process(job: tuple[str, int, float, float, list]) -> dict:
    url, clients, seconds, start_at, pairs = job
    PAIRS[:] = pairs  # a spawned process starts without main's pairs
    return asyncio.run(drive(url, clients, seconds, start_at))


def drive_spread(url: str, clients: int, seconds: float, pool: Any) -> dict:
    """The clients spread over the pool's client processes (one Python process's event loop tops
    out near a few thousand requests a second: more clients than that would measure the client),
    started together; their latencies pooled, and their CPU use summed, in cores."""
    processes = pool._processes if pool is not None else 1
    shares = [clients // processes + (index < clients % processes) for index in range(min(processes, clients))]
    if len(shares) == 1:
        parts = [asyncio.run(drive(url, clients, seconds, time.time()))]
    else:
        start_at = time.time() + 2.0  # every process connected and waiting when the clock starts
        parts = pool.map(_drive_in_process, [(url, share, seconds, start_at, PAIRS) for share in shares], chunksize=1)
    cpu = sum(part["client_cpu_seconds"] for part in parts)
    return {
        "latencies": [value for part in parts for value in part["latencies"]], "errors": sum(part["errors"] for part in parts),
        "seconds": seconds, "client_cores": cpu / (seconds + WARM_UP_SECONDS), "client_processes": len(shares),
    }


def forward_passes(port: int, kind: str) -> list[float]:
    """ftcli's (forward passes, inputs in them) so far, from /metrics; nothing for the baseline."""
    if kind == "baseline":
        return []
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("ftcli_batch_size_")}
    return [values["ftcli_batch_size_count"], values["ftcli_batch_size_sum"]]


def summary(kind: str, clients: int, rounds: list[dict]) -> dict:
    """One row from its rounds: their requests pooled."""
    values = np.asarray([value for one in rounds for value in one["latencies"]]) * 1000
    seconds = sum(one["seconds"] for one in rounds)
    passes, inputs = (sum(one["passes"][index] for one in rounds if one["passes"]) for index in (0, 1))
    return {
        "server": kind, "clients": clients, "rounds": len(rounds), "requests": len(values),
        "requests_per_second": len(values) / seconds, "errors": sum(one["errors"] for one in rounds),
        "inputs_per_pass": inputs / passes if passes else float("nan"),
        **{f"p{q}_ms": float(np.percentile(values, q)) if len(values) else float("nan") for q in (50, 95, 99)},
        "client_processes": rounds[0]["client_processes"],
        "client_cores": float(np.mean([one["client_cores"] for one in rounds])),
    }


def measure(
    kinds: list[str], run: Path, levels: list[int], seconds: float, rounds: int, before: Path | None, processes: int
) -> list[dict]:
    """Every server started, then each client count driving each server in turn, `rounds` times."""
    ports = {kind: free_port() for kind in kinds}
    servers = [start_server(kind, run, ports[kind], before) for kind in kinds]
    results: dict[tuple[str, int], list[dict]] = {}
    pool = multiprocessing.get_context("spawn").Pool(processes) if processes > 1 else None
    try:
        for kind, server in zip(kinds, servers):
            try:
                asyncio.run(ready(f"http://127.0.0.1:{ports[kind]}{'/predict' if kind == 'baseline' else '/v1/predict'}", server))
            except RuntimeError:
                print(f"{kind} never answered; its output:\n{Path(server.log_path).read_text()[-4000:]}", file=sys.stderr)
                raise
        for _ in range(rounds):
            for clients in levels:
                for kind in kinds:
                    route = "/predict" if kind == "baseline" else "/v1/predict"
                    url = f"http://127.0.0.1:{ports[kind]}{route}"
                    passes = forward_passes(ports[kind], kind)
                    result = drive_spread(url, clients, seconds, pool)
                    result["passes"] = [after - before for after, before in zip(forward_passes(ports[kind], kind), passes)]
                    results.setdefault((kind, clients), []).append(result)
    finally:
        if pool is not None:
            pool.terminate()
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=60)
    return [summary(kind, clients, results[kind, clients]) for kind in kinds for clients in levels]


def print_table(rows: list[dict]) -> None:
    baseline = {row["clients"]: row for row in rows if row["server"] == "baseline"}
    print(f"{'server':<14}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'req/s vs (a)':>14}{'p50 vs (a)':>12}{'batch':>7}{'client cores':>14}")
    for row in rows:
        reference = baseline.get(row["clients"])
        ratio = row["requests_per_second"] / reference["requests_per_second"] if reference else float("nan")
        latency = row["p50_ms"] / reference["p50_ms"] if reference else float("nan")
        print(
            f"{row['server']:<14}{row['clients']:>8}{row['requests_per_second']:>9.1f}{row['p50_ms']:>9.1f}"
            f"{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8}{ratio:>13.2f}x{latency:>11.2f}x{row['inputs_per_pass']:>7.1f}"
            f"{row['client_cores']:>9.2f} of {row['client_processes']}"
        )


def load_pairs(data_dir: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines() if line.strip()]
    return [(row["sentence1"], row["sentence2"]) for row in rows]


PAIRS: list[tuple[str, str]] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="A trained MRPC run (default: train a short one)")
    parser.add_argument("--data-dir", type=Path, default=MRPC)
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured seconds per row and client count")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--servers", default="baseline,torch,int8", help=f"Rows, in order: {', '.join(SERVERS)}")
    parser.add_argument("--before", type=Path, default=None, help="ftcli's source at an earlier commit, for the row 'before'")
    parser.add_argument("--rounds", type=int, default=1, help="Passes over every server and client count")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument(
        "--client-processes", type=int, default=None,
        help="Processes the clients are spread over (default: 1 on a machine of 4 cores or fewer, else 6)",
    )
    parser.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON")
    parser.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)  # internal: run row (a)'s server
    parser.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        import uvicorn

        uvicorn.run(baseline_app(args.baseline_server), host="127.0.0.1", port=args.port, log_level="warning")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    PAIRS.extend(load_pairs(args.data_dir))
    levels = [int(value) for value in args.clients.split(",")]
    kinds = [SERVERS[name] for name in args.servers.split(",")]
    if "ftcli before" in kinds and args.before is None:
        parser.error("the row 'before' needs --before DIR (git archive REF | tar -x -C DIR)")
    with tempfile.TemporaryDirectory() as workdir:
        run = args.run or train_run(Path(workdir), args.train_steps)
        quantization = export_int8(run) if "ftcli int8" in kinds else None
        print(f"int8 export: {json.dumps(quantization)}")
        processes = args.client_processes or (1 if (os.cpu_count() or 1) <= 4 else 6)
        rows = measure(kinds, run, levels, args.seconds, args.rounds, args.before, processes)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"quantization": quantization, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
