"""The serve command: a run's model behind an HTTP endpoint (ftcli.serving), on uvicorn.

Everything that can be a user mistake (the run, the engine's files, the port) is checked before
the server listens, as one line and exit 2. The model is then warmed up while /health answers
503. SIGTERM (or Ctrl-C) stops taking connections, answers the requests in flight, stops the
batcher and returns: exit 0. With --workers N, uvicorn's supervisor runs N processes on the one
listening socket, each with the model (and the cores divided among them) and its own bounded queue;
SIGTERM to the command drains every one of them. Their metrics meet in a private folder that
/metrics adds up, removed when they stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from ftcli import tasks
from ftcli.config import load_config
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.runs.rundir import RunDir

API_KEY_ENV = "FTCLI_API_KEY"
OPTIONS_ENV = "FTCLI_SERVE_OPTIONS"  # how --workers processes learn the options
GRACEFUL_SHUTDOWN_SECONDS = 30  # the longest SIGTERM waits for requests in flight
# How long a --workers process may take to answer the supervisor's ping before it is killed and
# replaced: uvicorn's 5 s is shorter than importing torch and loading a model on a busy machine.
WORKER_HEALTHCHECK_SECONDS = 60


@dataclass(frozen=True)
class ServeOptions:
    run_path: str
    engine: str = "auto"
    quantized: bool = False
    max_batch: int = 64
    max_wait_ms: float = 0.0  # no timer: a batch is what queued while the engine was busy
    max_queue: int | None = None  # inputs waiting; None: 16 batches' worth
    workers: int = 1
    max_inputs: int = 256
    max_chars: int = 20_000
    max_batch_tokens: int = 16_384  # padded tokens per forward pass (batcher.DEFAULT_MAX_BATCH_TOKENS)
    cuda_graphs: bool = True  # the torch engine on a GPU replays CUDA graphs (serving/graphs.py)


def build_app(options: ServeOptions, metrics_dir: str | None = None):
    """The FastAPI app for these options: the model loaded (not yet warmed up) behind its batcher;
    metrics_dir: the --workers processes' shared folder of metrics."""
    from ftcli.serving.app import create_app
    from ftcli.serving.batcher import Batcher
    from ftcli.serving.engines import cpu_threads
    from ftcli.serving.graphs import with_cuda_graphs
    from ftcli.serving.metrics import ServingMetrics
    from ftcli.serving.requests import Limits
    from ftcli.serving.served import load_served

    served = load_served(options.run_path, options.engine, options.quantized, cpu_threads(options.workers))
    if options.cuda_graphs:
        served = replace(served, engine=with_cuda_graphs(served.engine, options.max_batch, options.max_batch_tokens))
    metrics = ServingMetrics(options.max_batch, metrics_dir)
    batcher = Batcher(
        served.engine, served.tokenizer.pad_token_id, served.config.data.max_length, options.max_batch,
        options.max_wait_ms, options.max_queue or 16 * options.max_batch, metrics, options.max_batch_tokens,
        tokenizer_threads=cpu_threads(options.workers),
    )
    limits = Limits(max_inputs=options.max_inputs, max_chars=options.max_chars)
    return create_app(served, batcher, metrics, limits, os.environ.get(API_KEY_ENV) or None)


def app_from_environment():
    """uvicorn's factory in each --workers process: the options the command put in the environment.
    A worker that cannot load the model (the GPU full with the others' copies, the run gone) says
    why and exits as a startup failure: uvicorn's supervisor then stops, where any other exit
    would have it start the worker again, and again."""
    from uvicorn.config import STARTUP_FAILURE

    from ftcli.serving.metrics import SHARED_DIR_ENV

    _log_to_terminal()
    try:
        return build_app(ServeOptions(**json.loads(os.environ[OPTIONS_ENV])), os.environ[SHARED_DIR_ENV])
    except FtcliError as error:
        logging.getLogger("ftcli.serve").error("this worker cannot start: %s", error)
    except Exception:
        logging.getLogger("ftcli.serve").exception("this worker cannot start")
    sys.exit(STARTUP_FAILURE)


def serve_run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, say: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain and return."""
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "ftcli serve")
    import uvicorn

    _check(options)
    listener = _bind(host, port)
    _log_to_terminal()
    config = dict(log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    key = "with an API key" if os.environ.get(API_KEY_ENV) else f"without an API key (set {API_KEY_ENV} to require one)"
    if options.workers == 1:
        app = build_app(options)
        say(f"serving {options.run_path} ({options.engine}) on http://{host}:{port} {key}")
        server = uvicorn.Server(uvicorn.Config(app, **config))
        with _exit_cleanly_on_signals():
            server.run(sockets=[listener])
        return
    load_check = build_app(options)  # the model loads once here, so its mistakes end as one line
    del load_check
    say(f"serving {options.run_path} ({options.engine}, {options.workers} workers) on http://{host}:{port} {key}")
    _serve_workers(options, listener, config)


def _serve_workers(options: ServeOptions, listener: socket.socket, settings: dict) -> None:
    """--workers N: uvicorn's supervisor starts N processes that share the listener; on SIGTERM or
    Ctrl-C it sends each a SIGTERM, and each drains as a single server does, and waits for them."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess

    config = uvicorn.Config(
        f"{__name__}:app_from_environment", factory=True, workers=options.workers,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS, **settings,
    )
    with _worker_environment(options), _exit_cleanly_on_signals(tuple(SIGNALS)):
        supervisor = Multiprocess(config, sockets=[listener])
        supervisor.run()
    listener.close()
    failed = sum(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    if failed:
        raise FtcliError(
            f"{failed} of {options.workers} server workers could not start; the log above says why",
            "fix that, or pass fewer --workers: each loads the model",
        )


@contextmanager
def _worker_environment(options: ServeOptions) -> Iterator[None]:
    """What the worker processes inherit: the options, and a fresh private folder for their metrics
    (prometheus-client in each keeps its values there), removed once they have stopped."""
    from ftcli.serving.metrics import SHARED_DIR_ENV

    folder = tempfile.mkdtemp(prefix="ftcli-serve-metrics-")
    saved = {name: os.environ.get(name) for name in (OPTIONS_ENV, SHARED_DIR_ENV)}
    os.environ.update({OPTIONS_ENV: json.dumps(asdict(options)), SHARED_DIR_ENV: folder})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def _check(options: ServeOptions) -> None:
    if not Path(options.run_path).is_dir():
        raise FtcliError(f"run directory {options.run_path} does not exist", "pass a folder written by ftcli train")
    if options.max_queue is not None and options.max_queue < options.max_batch:
        raise FtcliError(
            f"--max-queue {options.max_queue} is smaller than --max-batch {options.max_batch}",
            "let the queue hold at least one batch",
        )
    run = RunDir.open(options.run_path)
    config = load_config(run.config_file)
    tasks.require_support(config.task, "serve", f"predict with ftcli predict {options.run_path} --text ...")
    if options.max_batch_tokens < config.data.max_length:
        raise FtcliError(
            f"--max-batch-tokens {options.max_batch_tokens} is smaller than one input of data.max_length={config.data.max_length} tokens",
            f"pass --max-batch-tokens {config.data.max_length} or more",
        )


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is a user error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it Nagle's algorithm holds each response's last small
    # segment for the client's delayed ACK, 40 ms a request (measured: /health 44 ms, 0.9 ms with it).
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise FtcliError(f"cannot listen on {host}:{port}: {error.strerror}", "pick another --port or --host") from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _log_to_terminal() -> None:
    """ftcli.serve's lines (ready, failures) beside uvicorn's; never a request's headers or the key."""
    logger = logging.getLogger("ftcli.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _exit_cleanly_on_signals:
    """uvicorn drains on SIGTERM and SIGINT, then raises the signal again with the handler it found;
    with Python's defaults that would kill the process (or raise KeyboardInterrupt) after a clean
    drain. Handlers that do nothing make the drained server return, and the command exit 0."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals  # --workers: every one uvicorn's supervisor takes over, given back after

    def __enter__(self) -> None:
        self.previous = {number: signal.signal(number, lambda *_: None) for number in self.signals}

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
