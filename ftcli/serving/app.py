"""The HTTP face of a served run: FastAPI routes over one ServedModel and its Batcher.

ftcli's own API:
    POST /v1/predict  {"predictions": [...]}: per input the fields ftcli predict gives (a tagger's: its entities)
    GET  /v1/health   {"status": "ok"} once the model is loaded and warmed up; 503 {"status": "loading"} before
    GET  /v1/info     model, task, labels, thresholds, text fields, engine, versions, the process id
    GET  /metrics     Prometheus text
text-embeddings-inference's, as TEI answers them for a classifier, so its clients work unchanged:
    POST /predict     [{"label", "score"}, ...] per input (a label per text: a tagger refuses it, 422);
                      also at POST / and POST /invocations (SageMaker), where TEI serves a classifier
    GET  /health      200 with an empty body once warmed up, 503 before; also at GET / and GET /ping
    GET  /info        model_id, model_dtype, model_type {"classifier": {id2label, label2id}}, the limits

Every refusal is a JSON body {"error": ..., "fix": ...} with a 4xx status; an unexpected failure
is a 500 with {"error": "internal error"} and is logged on the server, never sent as a traceback.
With an API key, every route but the health probes needs `Authorization: Bearer <key>`.
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
from ftcli.serving.requests import AUTO_TRUNCATE, ApiError, Limits, read_json, tei_inputs, v1_inputs
from ftcli.serving.served import ServedModel, Texts, TooLong

log = logging.getLogger("ftcli.serve")

ROUTES = ("/v1/predict", "/v1/health", "/v1/info", "/metrics", "/predict", "/", "/invocations", "/health", "/ping", "/info")
TEI_PREDICT_ROUTES = ("/predict", "/", "/invocations")
TEI_HEALTH_ROUTES = ("/health", "/", "/ping")
# Probes of a load balancer carry no key: GET / is one, POST / a prediction.
OPEN_ROUTES = {("GET", path) for path in (*TEI_HEALTH_ROUTES, "/v1/health")}
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

    @app.get("/v1/health")
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

    _add_tei_routes(app, served, batcher, limits, forward, state)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _add_tei_routes(
    app: FastAPI, served: ServedModel, batcher: Batcher, limits: Limits, forward: Callable[..., Any], state: dict[str, bool]
) -> None:
    """text-embeddings-inference's routes for a classifier, with its request and answer shapes."""

    async def predict_tei(request: Request) -> JSONResponse:
        if served.token_level:
            raise ApiError(
                422, "/predict (text-embeddings-inference's classifier route) gives a label per text, and this model tags words",
                'POST /v1/predict {"inputs": "a text"}: each text\'s entities with their characters',
            )
        body = tei_inputs(await read_json(request, limits), served.text_fields, limits)
        answers = [served.label_scores(logits, body.raw_scores) for logits in (await forward(body.inputs, body.truncate, body.side))[1]]
        return JSONResponse(answers if body.batch else answers[0])

    async def health_tei() -> Response:
        if not state["ready"]:
            return JSONResponse({"error": "the model is still loading", "fix": "retry in a moment"}, 503, {"Retry-After": RETRY_AFTER_SECONDS})
        return Response(status_code=200)

    # TEI's router settings, as ftcli's batcher holds them: requests are bounded by the inputs
    # queued (each at least one), a forward pass by its rows and padded tokens.
    router = {"max_concurrent_requests": batcher.max_queue, "max_input_length": served.config.data.max_length,
              "max_batch_tokens": batcher.max_batch_tokens, "max_batch_requests": batcher.max_batch,
              "max_client_batch_size": limits.max_inputs, "auto_truncate": AUTO_TRUNCATE,
              "tokenization_workers": batcher.tokenizer_threads}

    async def info_tei() -> JSONResponse:
        return JSONResponse(served.tei_info(router))

    for path in TEI_PREDICT_ROUTES:
        app.add_api_route(path, predict_tei, methods=["POST"])
    for path in TEI_HEALTH_ROUTES:
        app.add_api_route(path, health_tei, methods=["GET"])
    app.add_api_route("/info", info_tei, methods=["GET"])


def _forwarding(served: ServedModel, batcher: Batcher, state: dict[str, bool]) -> Callable[..., Any]:
    """The routes' one way to the model: each input's rows (tokenized in a tokenizer thread) and
    their logits, from the batcher; 503 while loading or at capacity."""
    encode = _tokenizing(served, batcher)

    async def forward(inputs: list[Texts], truncate: bool = True, side: str | None = None) -> tuple[list[list[Row]], list[np.ndarray]]:
        if not state["ready"]:
            raise ApiError(503, "the model is still loading", "retry in a moment", {"Retry-After": RETRY_AFTER_SECONDS})
        encoded: list[list[list[Row]]] = []  # the rows, kept for the answers (a tagger's words)

        def encode_and_keep() -> list[list[Row]]:
            encoded.append(encode(inputs, truncate, side))
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


def _tokenizing(served: ServedModel, batcher: Batcher) -> Callable[[list[Texts], bool, str | None], list[list[Row]]]:
    """What the tokenizer threads run: token rows, or the 4xx that says why not."""
    encoders = _encoders(served, batcher.tokenizer_threads)

    def encode(inputs: list[Texts], truncate: bool, side: str | None) -> list[list[Row]]:
        mine = encoders.get()
        try:
            rows = mine.encode(inputs, truncate, side)
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
    truncate: false, truncation_direction: left) would race over it."""
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

        if self.expected is not None and (scope["method"], path) not in OPEN_ROUTES and not _authorized(Headers(scope=scope), self.expected):
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
