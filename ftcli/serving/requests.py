"""Reading a request body into inputs, or a 4xx ApiError that says what is wrong and how to fix it.

    POST /v1/predict  {"inputs": "text" | {"text": ..., "text_pair": ...} | a list of those}; any
                      other key is refused (ftcli's own API: a misspelt option must not pass unseen)
    POST /predict     text-embeddings-inference's shape: {"inputs": "text" | ["a", "b"] (one pair)
                      | [["a"], ["a", "b"], ...] (a batch), "raw_scores": false, "truncate": false,
                      "truncation_direction": "right"}; other keys are ignored, as TEI's serde
                      ignores them (huggingface_hub's InferenceClient sends "parameters")

Every limit is checked before anything is tokenized: the body's size while it is read, then its
UTF-8 and JSON, then the number of inputs and each text's characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request

from ftcli.serving.served import Texts


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 2 * 1024 * 1024
    max_inputs: int = 256  # per request
    max_chars: int = 20_000  # per text; longer ones are refused, not truncated unseen


class ApiError(Exception):
    """A request the server refuses: its status and a JSON body {"error": ..., "fix": ...}."""

    def __init__(self, status: int, message: str, fix: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.fix, self.headers = status, message, fix, headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message} | ({"fix": self.fix} if self.fix else {})


async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON, read no further than max_body_bytes."""
    too_large = ApiError(413, f"the body is larger than {limits.max_body_bytes} bytes", "send fewer or shorter inputs per request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_large
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {error.start})", "send the JSON encoded as UTF-8") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}", 'send e.g. {"inputs": "a text"}') from None


def _object_with_inputs(body: Any, example: str) -> dict[str, Any]:
    if not isinstance(body, dict) or "inputs" not in body:
        raise ApiError(422, "the body must be a JSON object with 'inputs'", f"send e.g. {example}")
    return body


def _check_text(value: Any, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"{where} is {'null' if value is None else 'a ' + type(value).__name__}, not a string", "every text must be a string")
    if len(value) > limits.max_chars:
        raise ApiError(413, f"{where} has {len(value)} characters, more than {limits.max_chars}", "shorten it or split it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800": valid JSON, not text
        raise ApiError(400, f"{where} is not valid Unicode (a lone surrogate)", "send well-formed UTF-8 text") from None
    return value


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise ApiError(422, "'inputs' is an empty list", "send at least one input")
    if count > limits.max_inputs:
        raise ApiError(413, f"{count} inputs in one request, more than {limits.max_inputs}", "split them over several requests")


def _arity(texts: Texts, index: int, fields: list[str]) -> Texts:
    if len(fields) == 2 and len(texts) == 1:
        raise ApiError(422, f"input {index} has no text_pair: this model classifies sentence pairs ({fields[0]}, {fields[1]})", "send each input as a pair")
    if len(fields) == 1 and len(texts) == 2:
        raise ApiError(422, f"input {index} is a pair: this model classifies single texts", "send each input as one text")
    return texts


def v1_inputs(body: Any, fields: list[str], limits: Limits) -> list[Texts]:
    """/v1/predict's inputs, each a text or a pair, in the request's order."""
    body = _object_with_inputs(body, '{"inputs": "a text"} or {"inputs": [{"text": "a", "text_pair": "b"}]}')
    unknown = sorted(set(body) - {"inputs"})
    if unknown:
        raise ApiError(422, f"unknown key {', '.join(repr(key) for key in unknown)}", "the only key is inputs")
    raw = body["inputs"]
    items = raw if isinstance(raw, list) else [raw]
    _check_count(len(items), limits)
    return [_arity(_v1_item(item, index, fields, limits), index, fields) for index, item in enumerate(items)]


def _v1_item(item: Any, index: int, fields: list[str], limits: Limits) -> Texts:
    if isinstance(item, str):
        return (_check_text(item, f"input {index}", limits),)
    if not isinstance(item, dict):
        raise ApiError(422, f"input {index} is a {type(item).__name__}", 'each input is a string or {"text": ..., "text_pair": ...}')
    # {"text", "text_pair"} as transformers' pipelines take it, or the run's own column names.
    names = ["text", "text_pair"] if "text" in item else fields
    unknown = sorted(set(item) - set(names))
    if unknown or names[0] not in item:
        raise ApiError(422, f"input {index} has keys {sorted(item)}", f"use 'text' and 'text_pair' (or {', '.join(fields)})")
    return tuple(_check_text(item[name], f"input {index} {name}", limits) for name in names if name in item)


AUTO_TRUNCATE = False  # /predict's truncate when a request leaves it out or null (TEI's --auto-truncate)
# TEI's TruncationDirection: serde's names and aliases, exactly (so "RIGHT" is refused as there).
DIRECTIONS = {"Right": "right", "right": "right", "Left": "left", "left": "left"}


@dataclass(frozen=True)
class TeiRequest:
    """A /predict body: its inputs and whether the answer is a batch (a list per input)."""

    inputs: list[Texts]
    batch: bool
    raw_scores: bool = False
    truncate: bool = AUTO_TRUNCATE
    side: Literal["right", "left"] | None = None  # the end truncation cuts; None: the run's tokenizer's, as ftcli predict


def tei_inputs(body: Any, fields: list[str], limits: Limits) -> TeiRequest:
    """/predict's request; keys other than TEI's PredictRequest fields are ignored, as TEI does."""
    body = _object_with_inputs(body, '{"inputs": "a text"}')
    raw_scores, truncate = body.get("raw_scores", False), body.get("truncate")
    if not isinstance(raw_scores, bool) or not isinstance(truncate, (bool, type(None))):
        raise ApiError(422, "'raw_scores' must be true or false, and 'truncate' true, false or null", "send JSON booleans")
    direction = body.get("truncation_direction")
    side = DIRECTIONS.get(direction) if isinstance(direction, str) else None
    if side is None and "truncation_direction" in body:
        raise ApiError(422, f"truncation_direction {json.dumps(direction)} is neither 'right' nor 'left'", "send 'right' or 'left'")
    raw = body["inputs"]
    batch = isinstance(raw, list) and bool(raw) and isinstance(raw[0], list)
    sequences = raw if batch else [raw if isinstance(raw, list) else [raw]]
    if not batch and isinstance(raw, list) and not raw:
        sequences = []
    _check_count(len(sequences), limits)
    inputs = []
    for index, sequence in enumerate(sequences):
        if not isinstance(sequence, list) or len(sequence) not in (1, 2):
            raise ApiError(422, f"input {index} must be a string or a list of 1 or 2 strings", 'send "text", ["text", "pair"] or [["a"], ["b", "c"]]')
        texts = tuple(_check_text(text, f"input {index}", limits) for text in sequence)
        inputs.append(_arity(texts, index, fields))
    return TeiRequest(inputs, batch, raw_scores, AUTO_TRUNCATE if truncate is None else truncate, side)
