"""A text's words for token_classification, with the `tokenizers` library alone (no torch, no
transformers): how a text to tag is cut into words with their characters, and the tokenizer that
reads each pre-split word as following a space. data.prepare uses them on transformers' tokenizers
(their backend), onnx_predict on an export's tokenizer.json, so both engines tag the same words.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Span = tuple[int, int]  # a word's characters in its text: start, end


def split_words(text: str, tokenizer: Any) -> list[tuple[str, Span]]:
    """A text's words as the tokenizer's pre-tokenizer cuts them, each with its characters
    (start, end); on whitespace for a tokenizer without one. tokenizer: transformers' (its
    backend_tokenizer's pre-tokenizer is read) or a tokenizers.Tokenizer."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", tokenizer), "pre_tokenizer", None)
    if pre is None:
        return [(found.group(), found.span()) for found in re.finditer(r"\S+", text)]
    words = []
    for _, (start, end) in pre.pre_tokenize_str(text):
        piece = text[start:end]
        start, end = start + len(piece) - len(piece.lstrip()), end - (len(piece) - len(piece.rstrip()))
        if end > start:  # byte-level BPE's words carry the space before them, or are one
            words.append((text[start:end], (start, end)))
    return words


def words_of(cells: list[Any], tokenizer: Any) -> tuple[list[list[str]], list[list[Span] | None]]:
    """Each cell's words and, for a cell that is one text (split by split_words), each word's
    characters; a cell that is a list of words is taken as it is (its characters: None)."""
    split = [split_words(cell, tokenizer) if isinstance(cell, str) else None for cell in cells]
    words = [[word for word, _ in found] if found is not None else list(cell) for cell, found in zip(cells, split)]
    return words, [[span for _, span in found] if found is not None else None for found in split]


def prefix_spaced_backend(backend: Tokenizer) -> Tokenizer | None:
    """For byte-level BPE (RoBERTa, GPT-2), a copy of the tokenizer that reads each pre-split word
    as following a space (add_prefix_space), as the word does in running text: without it a word
    is cut into the pieces of a word's start (Smith -> Sm, ith rather than one ĠSmith). None for
    a tokenizer that needs no copy."""
    # The pre-tokenizer's own state (its pickled form, a few bytes of JSON) says whether a copy is
    # needed: the whole tokenizer's, with its vocabulary, takes a tenth of a second to write out.
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    byte_level = [part for part in [pre, *pre.get("pretokenizers", [])] if part.get("type") == "ByteLevel" and not part.get("add_prefix_space")]
    if not byte_level:
        return None
    for part in byte_level:
        part["add_prefix_space"] = True
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    state["pre_tokenizer"] = pre
    return Tokenizer.from_str(json.dumps(state))
