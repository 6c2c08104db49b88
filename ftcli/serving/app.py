"""The HTTP face of a served run: FastAPI routes over one ServedModel and its Batcher.

    POST /v1/predict  {"predictions": [...]}: per input the fields ftcli predict gives (a tagger's: its entities)
    POST /predict     text-embeddings-inference's classifier route: [{"label", "score"}, ...] per input
                      (a label per text: a tagger refuses it, 422)
    GET  /health      200 once the model is loaded and warmed up, 503 before
    GET  /v1/info     model, task, labels, thresholds, text fields, engine, versions, the process id
    GET  /metrics     Prometheus text

Every refusal is a JSON body {"error": ..., "fix": ...} with a 4xx status; an unexpected failure
is a 500 with {"error": "internal error"} and is logged on the server, never sent as a traceback.
With an API key, every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import os
import queue
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ftcli.errors import FtcliError
from ftcli.serving.batcher import Batcher, QueueFull, Row, warm_up
from ftcli.serving.metrics import ServingMetrics
from ftcli.serving.requests import ApiError, Limits, read_json, tei_inputs, v1_inputs
from ftcli.serving.served import ServedModel, Texts, TooLong

log = logging.getLogger("ftcli.serve")

ROUTES = ("/v1/predict", "/predict", "/health", "/v1/info", "/metrics")
OPEN_ROUTES = ("/health",)  # probes of a load balancer carry no key
RETRY_AFTER_SECONDS = "1"


def create_app(
    served: ServedModel, batcher: Batcher, metrics: ServingMetrics, limits: Limits = Limits(), api_key: str | None = None
) -> FastAPI:
    """The app; its lifespan starts the batcher and warms the model up, and stops the batcher last."""
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        warming = asyncio.get_running_loop().run_in_executor(None, _warm, served, batcher, state)
        yield
        await asyncio.gather(warming, return_exceptions=True)
        await batcher.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_guard(app, metrics, api_key)
    _add_error_handlers(app)

    forward = _forwarding(served, batcher, state)

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        inputs = v1_inputs(await read_json(request, limits), served.text_fields, limits)
        return JSONResponse({"predictions": served.predictions(inputs, *await forward(inputs))})

    @app.post("/predict")
    async def predict_tei(request: Request) -> JSONResponse:
        if served.token_level:
            raise ApiError(
                422, "/predict (text-embeddings-inference's classifier route) gives a label per text, and this model tags words",
                'POST /v1/predict {"inputs": "a text"}: each text\'s entities with their characters',
            )
        inputs, batch, raw_scores, truncate = tei_inputs(await read_json(request, limits), served.text_fields, limits)
        answers = [served.label_scores(logits, raw_scores) for logits in (await forward(inputs, truncate))[1]]
        return JSONResponse(answers if batch else answers[0])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, 503, {"Retry-After": RETRY_AFTER_SECONDS})
        return JSONResponse({"status": "ok"})

    settings = {"max_batch": batcher.max_batch, "max_batch_tokens": batcher.max_batch_tokens,
                "max_wait_ms": batcher.max_wait * 1000, "max_queue": batcher.max_queue,
                "max_inputs": limits.max_inputs, "max_chars": limits.max_chars}

    @app.get("/v1/info")
    async def info() -> JSONResponse:
        # pid: with --workers, which process took this connection
        return JSONResponse(served.info(settings) | {"ready": state["ready"], "pid": os.getpid()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _forwarding(served: ServedModel, batcher: Batcher, state: dict[str, bool]) -> Callable[..., Any]:
    """The routes' one way to the model: each input's rows (tokenized in a tokenizer thread) and
    their logits, from the batcher; 503 while loading or at capacity."""
    encode = _tokenizing(served, batcher)

    async def forward(inputs: list[Texts], truncate: bool = True) -> tuple[list[list[Row]], list[np.ndarray]]:
        if not state["ready"]:
            raise ApiError(503, "the model is still loading", "retry in a moment", {"Retry-After": RETRY_AFTER_SECONDS})
        encoded: list[list[list[Row]]] = []  # the rows, kept for the answers (a tagger's words)

        def encode_and_keep() -> list[list[Row]]:
            encoded.append(encode(inputs, truncate))
            return encoded[-1]

        try:
            logits = await batcher.submit(len(inputs), encode_and_keep)
        except QueueFull:
            raise ApiError(
                503, f"the server is at capacity ({batcher.max_queue} inputs waiting)", "retry shortly",
                {"Retry-After": RETRY_AFTER_SECONDS},
            ) from None
        return encoded[0], logits

    return forward


def _tokenizing(served: ServedModel, batcher: Batcher) -> Callable[[list[Texts], bool], list[list[Row]]]:
    """What the tokenizer threads run: token rows, or the 4xx that says why not."""
    encoders = _encoders(served, batcher.tokenizer_threads)

    def encode(inputs: list[Texts], truncate: bool) -> list[list[Row]]:
        mine = encoders.get()
        try:
            rows = mine.encode(inputs, truncate)
        except TooLong as error:
            raise ApiError(
                413, f"input {error.index} has {error.tokens} tokens, more than data.max_length={served.config.data.max_length}",
                'send "truncate": true',
            ) from None
        except FtcliError as error:  # e.g. a pair whose second text leaves no room for windows
            raise ApiError(422, error.message, error.hint) from None
        finally:
            encoders.put(mine)
        if sum(len(input_rows) for input_rows in rows) > batcher.max_queue:
            raise ApiError(413, f"more inputs than the server's queue holds ({batcher.max_queue})", "split them over several requests")
        return rows

    return encode


def _encoders(served: ServedModel, count: int) -> queue.SimpleQueue:
    """A copy of the model's tokenizer per tokenizer thread: transformers sets truncation on the
    Rust tokenizer it shares at every call, so two threads asking for different truncation (TEI's
    truncate: false) would race over it."""
    encoders: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(count):
        encoders.put(replace(served, tokenizer=copy.deepcopy(served.tokenizer)))
    return encoders


def _warm(served: ServedModel, batcher: Batcher, state: dict[str, bool]) -> None:
    try:
        sample = served.encode([tuple("warm up" for _ in served.text_fields)])[0][0]
        started = time.perf_counter()
        warm_up(batcher, sample)
    except Exception:  # /health then stays 503: the server is up but must not be sent traffic
        log.exception("warm-up failed")
        return
    state["ready"] = True
    log.info("warmed up in %.1f s; ready", time.perf_counter() - started)


def _add_guard(app: FastAPI, metrics: ServingMetrics, api_key: str | None) -> None:
    """Around every request: the key check, the 500 without a traceback, and the metrics."""
    app.add_middleware(_Guard, metrics=metrics, expected=api_key.encode() if api_key else None)


class _Guard:
    """A plain ASGI middleware: Starlette's @app.middleware("http") runs every request through an
    extra task and memory streams, which cost more than the rest of the front end's bookkeeping
    (measured with a zero-cost engine, see bench/RESULTS.md)."""

    def __init__(self, app: Any, metrics: ServingMetrics, expected: bytes | None) -> None:
        self.app, self.metrics, self.expected = app, metrics, expected

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path = time.perf_counter(), scope["path"]
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if self.expected is not None and path not in OPEN_ROUTES and not _authorized(Headers(scope=scope), self.expected):
            bearer = {"WWW-Authenticate": "Bearer"}
            await _error_response(ApiError(401, "missing or wrong API key", "send the header Authorization: Bearer <key>", bearer))(
                scope, receive, sending
            )
        else:
            try:
                await self.app(scope, receive, sending)
            except Exception:
                log.exception("%s %s failed", scope["method"], path)
                await _error_response(ApiError(500, "internal error", "the server logged it; retry, or report it"))(
                    scope, receive, sending
                )
        self.metrics.observe(path if path in ROUTES else "other", status, time.perf_counter() - started)


def _authorized(headers: Headers, expected: bytes) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a wrong key as for a right one: no timing hint of its bytes
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        fix = f"the routes are {', '.join(ROUTES)}" if error.status_code in (404, 405) else None
        return _error_response(ApiError(error.status_code, str(error.detail).lower(), fix, dict(error.headers or {})))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
