"""token_classification: one tag per word (named entities in IOB2, or plain tags such as parts of
speech): softmax per token, cross-entropy over each word's first sub-token.

A row is {"tokens": [words], "ner_tags": [tags]} (CoNLL files read so; jsonl rows of two lists
too). Tags in IOB1 or BIOES are read into IOB2 (data.tag_scheme), so training, metrics and
predictions all speak IOB2. Labels are aligned to sub-tokens when tokenized (`align`): the first
sub-token of a word carries its tag, the others IGNORE (or, with data.label_all_subwords, the tag
with B- made I-). Metrics are entity-level in strict IOB2 (exact span and type, as seqeval's
strict mode), plus token accuracy over the labelled sub-tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ftcli.errors import FtcliError
from ftcli.tasks.base import TOP, Decider, MetricSpec, Objective, Option, Task
from ftcli.tasks.labels import label_value
from ftcli.tasks.single_label import SingleLabel, SingleLabelObjective, softmax

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ftcli")

NAME = "token_classification"
IGNORE = -100  # a sub-token the loss and the metrics skip (a word's later pieces, special tokens, padding)
PREFIXES = ("B", "I", "E", "S")
SCHEMES = ("auto", "iob1", "iob2", "bioes")
STRIDE = 32  # data.stride's default, for a max_length of 128 tokens or more


# ---------------------------------------------------------------- tag schemes


def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) of an entity tag; ("O", "") for O."""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if tag != "O" else ("O", "")


def is_entity_tagging(tags: set[str]) -> bool:
    """Whether every tag is O or a scheme's prefix and a type (B-person); else plain tags (POS)."""
    return any(tag != "O" for tag in tags) and all(tag == "O" or (tag[:2] in {p + "-" for p in PREFIXES} and len(tag) > 2) for tag in tags)


def detect_scheme(sentences: list[list[str]]) -> str:
    """bioes when E- or S- occur; iob1 when an I- opens an entity (after O or another type); else iob2."""
    tags = {tag for sentence in sentences for tag in sentence}
    if any(tag[:2] in ("E-", "S-") for tag in tags):
        return "bioes"
    for sentence in sentences:
        before = "O"
        for tag in sentence:
            prefix, kind = _split(tag)
            if prefix == "I" and _split(before)[1] != kind:
                return "iob1"
            before = tag
    return "iob2"


def to_iob2(tags: list[str], scheme: str) -> list[str] | None:
    """The sentence's tags in IOB2, or None when they are no valid sequence of `scheme`."""
    converted, before = [], "O"
    for position, tag in enumerate(tags):
        prefix, kind = _split(tag)
        continues = _split(before)[1] == kind and _split(before)[0] in ("B", "I")
        after = _split(tags[position + 1]) if position + 1 < len(tags) else ("O", "")
        if prefix == "O":
            new = "O"
        elif scheme == "iob1":
            if prefix not in ("B", "I"):
                return None
            new = f"B-{kind}" if prefix == "B" or not continues else tag
        elif scheme == "iob2":
            if prefix not in ("B", "I") or (prefix == "I" and not continues):
                return None
            new = tag
        else:  # bioes: B and I go on to I or E of their type; I and E continue one
            if prefix in ("I", "E") and not continues:
                return None
            if prefix in ("B", "I") and not (after[1] == kind and after[0] in ("I", "E")):
                return None
            new = {"B": f"B-{kind}", "I": f"I-{kind}", "E": f"I-{kind}", "S": f"B-{kind}"}[prefix]
        converted.append(new)
        before = tag if scheme != "bioes" or prefix not in ("E", "S") else "O"
    return converted


def from_iob2(tags: list[str], scheme: str) -> list[str]:
    """Tags in IOB2 written in `scheme` (the data's, for predictions), entity by entity as strict
    IOB2 reads them (an I- that opens nothing is O): IOB1 opens with B- only right after an entity
    of the same type; BIOES marks single-word entities S- and last words E-."""
    if scheme == "iob2" or not is_entity_tagging(set(tags)):
        return list(tags)
    written = ["O"] * len(tags)
    previous_end, previous_kind = -1, ""
    for kind, start, end in entities(tags):
        if scheme == "iob1":
            written[start:end] = [f"I-{kind}"] * (end - start)
            if previous_end == start and previous_kind == kind:
                written[start] = f"B-{kind}"
        else:
            written[start:end] = [f"B-{kind}"] + [f"I-{kind}"] * (end - start - 2) + [f"E-{kind}"] if end - start > 1 else [f"S-{kind}"]
        previous_end, previous_kind = end, kind
    return written


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, word after the last) of each entity, strict IOB2: an entity opens at B-
    and goes on over I- of its type; an I- that opens nothing is no entity."""
    found, start, kind = [], None, ""
    for position, tag in enumerate([*tags, "O"]):
        prefix, this = _split(tag)
        if start is not None and not (prefix == "I" and this == kind):
            found.append((kind, start, position))
            start = None
        if prefix == "B":
            start, kind = position, this
    return found


# ---------------------------------------------------------------- alignment


def align(word_ids: list[int | None], word_tags: list[int], names: list[str], all_subwords: bool) -> list[int]:
    """A tag id per sub-token: the word's on its first piece; its other pieces IGNORE, or with
    all_subwords the word's tag with B- made I-; special tokens IGNORE."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE)
        elif word != previous:
            labels.append(word_tags[word])
        elif all_subwords:
            name = names[word_tags[word]]
            labels.append(names.index("I" + name[1:]) if name.startswith("B-") and "I" + name[1:] in names else word_tags[word])
        else:
            labels.append(IGNORE)
        previous = word
    return labels


def first_pieces(word_ids: list[int | None]) -> dict[int, int]:
    """Each word's first sub-token: word -> position, in word order (a word cut by max_length has none)."""
    firsts: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None:
            firsts.setdefault(word, position)
    return firsts


def words_and_tags(rows: np.ndarray, references: np.ndarray, names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Per sentence, the predicted and the true tags of its labelled sub-tokens (rows and
    references: a sentence each, padded with IGNORE)."""
    predicted, gold = [], []
    for decided, truth in zip(rows, references):
        decided, truth = np.asarray(decided), np.asarray(truth)
        kept = truth != IGNORE
        predicted.append([names[int(i)] for i in decided[: len(truth)][kept]])
        gold.append([names[int(i)] for i in truth[kept]])
    return predicted, gold


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each entity type, and their micro and macro averages
    (macro over the types in the truth or the predictions, as seqeval)."""
    found = {(index, *span) for index, tags in enumerate(predicted) for span in entities(tags)}
    true = {(index, *span) for index, tags in enumerate(gold) for span in entities(tags)}
    kinds = sorted({span[1] for span in found | true})
    scores = {kind: _prf({s for s in found if s[1] == kind}, {s for s in true if s[1] == kind}) for kind in kinds}
    scores["micro"] = _prf(found, true)
    scores["macro"] = {key: float(np.mean([scores[kind][key] for kind in kinds])) if kinds else 0.0 for key in ("precision", "recall", "f1")}
    scores["macro"]["support"] = len(true)
    return scores


def _prf(found: set, true: set) -> dict[str, float]:
    right = len(found & true)
    precision = right / len(found) if found else 0.0
    recall = right / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": len(true)}


# ---------------------------------------------------------------- entity errors

# How a wrong entity is wrong, as the error analysis counts them (each predicted entity that is
# not exactly a gold one is judged against the gold ones it overlaps; a gold one nothing overlaps is missed).
ERROR_KINDS = ("wrong type", "wrong boundary", "wrong type and boundary", "missed", "spurious")
EXAMPLES_PER_KIND = TOP // len(ERROR_KINDS)
Span = tuple[str, int, int]  # (type, first piece, piece after the last), as `entities` gives them


def entity_errors(predicted: list[str], gold: list[str]) -> list[tuple[str, Span | None, Span | None]]:
    """One sentence's entity errors, in the order they occur, each (kind, gold entity, predicted
    entity). A predicted entity that is not exactly a gold one is wrong once, against the gold
    ones it overlaps: the same span (wrong type), else one of its type (wrong boundary), else any
    (wrong type and boundary), else none (spurious); so these number the false positives. A gold
    entity that no predicted one overlaps is missed."""
    found, true = entities(predicted), entities(gold)
    right = set(found) & set(true)
    errors = [_judged(entity, [span for span in true if _overlap(span, entity)]) for entity in found if entity not in right]
    errors += [("missed", span, None) for span in true if not any(_overlap(span, entity) for entity in found)]
    return sorted(errors, key=lambda error: min(span[1] for span in error[1:] if span is not None))


def _overlap(first: Span, second: Span) -> bool:
    return first[1] < second[2] and second[1] < first[2]


def _judged(entity: Span, touched: list[Span]) -> tuple[str, Span | None, Span | None]:
    same_span = [span for span in touched if span[1:] == entity[1:]]
    same_type = [span for span in touched if span[0] == entity[0]]
    if same_span:
        return "wrong type", same_span[0], entity
    if same_type:
        return "wrong boundary", same_type[0], entity
    return ("wrong type and boundary", touched[0], entity) if touched else ("spurious", None, entity)


def entity_error_analysis(predicted: list[list[str]], gold: list[list[str]], words: list[list[tuple[int, str]]]) -> dict[str, list[dict]]:
    """How many entity errors of each kind, a few of each (round robin over the kinds, so the first
    rows show one of each), and the sentences with the most, their words tagged gold and
    predicted. words: per sentence, (word number, word) under each labelled piece."""
    per_sentence = [entity_errors(found, true) for found, true in zip(predicted, gold)]
    counts = Counter(kind for errors in per_sentence for kind, _, _ in errors)
    total = sum(counts.values())
    by_kind: dict[str, list[dict]] = {kind: [] for kind in ERROR_KINDS}
    for index, errors in enumerate(per_sentence):
        for kind, true, found in errors:
            if len(by_kind[kind]) < EXAMPLES_PER_KIND:
                named = {"gold": _named(true, words[index]), "predicted": _named(found, words[index])}
                by_kind[kind].append({"index": index, "kind": kind} | named)
    worst = sorted((index for index, errors in enumerate(per_sentence) if errors), key=lambda index: -len(per_sentence[index]))
    return {
        "entity_errors": [{"kind": kind, "count": counts[kind], "share": counts[kind] / total if total else 0.0} for kind in ERROR_KINDS],
        "error_examples": [entry for rank in zip_longest(*by_kind.values()) for entry in rank if entry is not None],
        "worst_sentences": [
            {"index": index, "errors": len(per_sentence[index]), "text": _tagged(words[index], gold[index], predicted[index])}
            for index in worst[:TOP]
        ],
    }


def _named(span: Span | None, words: list[tuple[int, str]]) -> str:
    """An entity as its words and type: "New York (location)"; "-" for none."""
    if span is None:
        return "-"
    kind, start, end = span
    return f"{' '.join(dict(words[start:end]).values())} ({kind})"


def _tagged(words: list[tuple[int, str]], gold: list[str], predicted: list[str]) -> str:
    """Each word with its tags (its first piece's): plain when both are O, word[tag] when they
    agree, word[gold→predicted] when they differ."""
    shown, previous = [], None
    for (number, word), true, found in zip(words, gold, predicted):
        if number != previous:
            shown.append(word if true == found == "O" else f"{word}[{true}]" if true == found else f"{word}[{true}→{found}]")
        previous = number
    return " ".join(shown)


def labelled_words(labels: np.ndarray, tokenized: Any, rows: list[dict] | None, field: str | None) -> list[list[tuple[int, str]]]:
    """Per sentence, (word number, word) under each labelled piece, from the tokenized split's
    word_ids and the rows' words; without them, the pieces' positions as #1, #2..."""
    known = tokenized is not None and rows is not None and field is not None
    word_ids = _sentence_word_ids(tokenized) if known else None
    words = []
    for index, truth in enumerate(labels):
        kept = np.flatnonzero(np.asarray(truth) != IGNORE)
        if not known:
            words.append([(number, f"#{number + 1}") for number in range(len(kept))])
            continue
        ids, sentence = word_ids[index], rows[index][field]
        words.append([(ids[position], str(sentence[ids[position]])) for position in kept])
    return words


def _joined_spans(words: list[str]) -> list[tuple[int, int]]:
    """Each word's characters in the words joined by spaces."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


def _entity_groups(words: list[tuple[str, float, int, int]], text: str) -> list[dict[str, Any]]:
    """Adjacent words of one type grouped as the pipeline's "simple" aggregation groups tokens: a
    B- (or another type, or O) opens a new group; O groups are left out."""
    groups: list[list[tuple[str, float, int, int]]] = []
    for word in words:
        prefix, kind = _pipeline_tag(word[0])
        if groups and prefix != "B" and kind == _pipeline_tag(groups[-1][-1][0])[1]:
            groups[-1].append(word)
        else:
            groups.append([word])
    return [
        {"entity_group": _pipeline_tag(group[0][0])[1], "score": float(np.mean([word[1] for word in group])),
         "word": text[group[0][2] : group[-1][3]], "start": group[0][2], "end": group[-1][3]}
        for group in groups
        if group[0][0] != "O"
    ]


def _pipeline_tag(tag: str) -> tuple[str, str]:
    """(B or I, type) as the pipeline reads a tag: one without B-/I- is an I of itself."""
    return (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("I", tag)


# ---------------------------------------------------------------- the objective


def pieces_per_sentence(labels: list[list[int]]) -> float:
    """The training rows' mean labelled pieces (at least 1): the constant a sentence's summed
    training loss is divided by, so that every piece weighs alike."""
    labelled = sum(sum(1 for label in row if label != IGNORE) for row in labels)
    return max(labelled / max(len(labels), 1), 1.0)


class TokenObjective(Objective):
    """Cross-entropy per labelled sub-token (optionally weighted per tag and smoothed). Training
    weighs every labelled piece alike, as HF's token-classification models do (a sentence's loss:
    its pieces' sum over the training split's mean pieces per sentence, a constant, so that the
    callers' division by examples gives the mean piece and accumulation and several processes stay
    exact); measured against each sentence's mean on WNUT-17 it scored 0.009-0.011 entity F1 more
    (bench/RESULTS.md). Evaluation's losses are each sentence's mean over its labelled pieces."""

    task = NAME
    picks_from_windows = True  # each token from the window it is most central in

    def __init__(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0, pieces_per_sentence: float = 1.0) -> None:
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.pieces_per_sentence = pieces_per_sentence

    def to(self, device: torch.device) -> TokenObjective:
        if self.class_weights is None:
            return self
        return TokenObjective(self.class_weights.to(device), self.label_smoothing, self.pieces_per_sentence)

    @staticmethod
    def _piece_losses(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, smoothing: float) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(
            logits.float().transpose(1, 2), labels, weight=weight, reduction="none", ignore_index=IGNORE, label_smoothing=smoothing,
        )

    def _sentence_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        counted = (labels != IGNORE).sum(dim=1)
        return self._piece_losses(logits, labels, None, 0.0).sum(dim=1) / counted.clamp(min=1)

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        from ftcli.tasks.tensors import sum_of_real

        pieces = self._piece_losses(logits, labels, self.class_weights, self.label_smoothing)
        return sum_of_real(pieces.sum(dim=1) / self.pieces_per_sentence, real)

    def soft_loss_sum(
        self, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """T^2 * KL(teacher's softened tag probabilities || the model's) per piece that counts (its
        label not IGNORE), a sentence's summed over the training split's mean pieces per sentence,
        as training_loss_sum weighs every piece alike."""
        from ftcli.tasks.tensors import softmax_kl, sum_of_real

        pieces = softmax_kl(logits, teacher, temperature) * (labels != IGNORE)
        return sum_of_real(pieces.sum(dim=1) / self.pieces_per_sentence, real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.losses(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._sentence_losses(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float(), dim=-1)

    def decide(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """A tag id per sub-token."""
        from ftcli.tasks.tensors import on_host

        return on_host(scores).argmax(-1)

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        from ftcli.tasks.tensors import on_host

        return on_host(logits.float()).argmax(-1)

    def calibration_pairs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[Objective, torch.Tensor, torch.Tensor]:
        """Each labelled piece (a word's first, or every piece with label_all_subwords) as one
        example of single-label classification over the tags: the temperature is fitted on the
        words, as single_label's on examples (a sentence's mean loss would weigh a short
        sentence's words more); IGNORE pieces (special tokens, padding, later pieces) are left out."""
        kept = labels != IGNORE
        return SingleLabelObjective(), logits[kept], labels[kept]

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Each sentence's logits at each place of its whole tokenization, from its windows' (rows,
        tokens, tags): every token's from the one window that reports it (positions: its place, -1
        where another window reports it), which for a word is the window it is most central in.
        Places no window reports (the pieces of a word longer than a window, past the window) are
        zeros."""
        return _in_sentences(logits, documents, count, positions, 0.0)

    def aggregate_labels(self, labels: torch.Tensor, documents: torch.Tensor, count: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Each sentence's tags, put together as `aggregate` puts its logits (IGNORE elsewhere)."""
        return _in_sentences(labels, documents, count, positions, IGNORE)


def _in_sentences(values: torch.Tensor, documents: torch.Tensor, count: int, positions: torch.Tensor | None, fill: float) -> torch.Tensor:
    """Windows' values per token (rows, tokens, ...) placed at their sentences' places."""
    if positions is None:
        raise ValueError("token_classification's windows are put together by their tokens' places (doc_positions)")
    rows, tokens = (positions >= 0).nonzero(as_tuple=True)
    width = int(positions.max()) + 1 if len(rows) else 0
    merged = values.new_full((count, width, *values.shape[2:]), fill)
    merged[documents[rows], positions[rows, tokens]] = values[rows, tokens]
    return merged


# ---------------------------------------------------------------- the task


def _default_stride(data: dict[str, Any]) -> int:
    """data.stride left out: a quarter of data.max_length, at most the 32 tokens other tasks
    default to, so that a short max_length still has windows that advance (the config allows a
    stride below half of max_length)."""
    length = data.get("max_length")
    return min(STRIDE, length // 4) if isinstance(length, int) and not isinstance(length, bool) else STRIDE


def _conll_file(config: Any) -> bool:
    """CoNLL data: a .conll file, or data.format: conll (this task's default, so set by hand under another)."""
    files = (config.data.train, config.data.validation, config.data.test)
    return config.data.format == "conll" or any(str(path or "").lower().endswith(".conll") for path in files)


class TokenClassification(Task):
    name = NAME
    about = "one tag per word (named entities)"
    problem_type = None  # transformers has none for token classification
    model_head = "token_classification"
    token_level = True
    # Long sentences are read in windows unless long_text: truncate says otherwise (a run trained
    # before windows existed says so in its saved config, and is read as it was trained).
    data_defaults = {"text_fields": ["tokens"], "label_field": "ner_tags", "long_text": "window", "stride": _default_stride,
                     "format": "conll"}
    default_metrics = ("f1", "precision", "recall", "accuracy")
    losses = ("cross_entropy",)
    metrics = {
        "f1": MetricSpec((NAME,), about="entity-level micro F1, strict IOB2 (exact span and type)"),
        "precision": MetricSpec((NAME,), about="entity-level micro precision, strict IOB2"),
        "recall": MetricSpec((NAME,), about="entity-level micro recall, strict IOB2"),
        "accuracy": MetricSpec((NAME,), about="share of labelled tokens whose tag is right"),
        "f1_macro": MetricSpec((NAME,), about="token_classification: entity-level F1 averaged over the types"),
    }
    pipeline_task = "token-classification"
    pipeline_arguments = ', aggregation_strategy="simple"'  # entities, as ftcli predict gives them
    calibrates = True  # on its words: each labelled piece is one example (TokenObjective.calibration_pairs)
    class_noun = "entity type"
    options = (
        *[option for option in SingleLabel.options if option.problem.startswith("training.label_smoothing")],  # read here too
        Option(lambda config: config.data.tag_scheme != "auto", "data.tag_scheme is for task: token_classification, not {task}"),
        Option(lambda config: config.data.label_all_subwords, "data.label_all_subwords is for task: token_classification, not {task}"),
        Option(_conll_file, "CoNLL data (a .conll file, data.format: conll) holds a tag per word: set task: "
               "token_classification, not {task} (or give a jsonl/csv file with one label per text)"),
    )

    def own_problems(self, config: Any) -> list[str]:
        """What token classification does not do, each with the fix."""
        if len(config.data.text_fields) != 1:
            return ["token_classification reads one column of words: give one data.text_fields (e.g. [tokens])"]
        return []

    # ---------------------------------------------------------------- labels

    def check_labels(self, rows: list[dict], data: Any, where: str) -> None:
        """Each row a non-empty list of words and as many tags; entity tags a valid sequence of
        data.tag_scheme. The rows' tags are rewritten in IOB2, in place, once."""
        words, field = data.text_fields[0], data.label_field
        where = _with_file(where, data)
        for number, row in enumerate(rows, start=1):
            tokens, tags = row[words], row[field]
            if isinstance(tokens, str) and not isinstance(tags, list):
                raise FtcliError(
                    f"{where} sentence {number}: '{words}' is a text with one label, not a list of words with a tag each",
                    "a label per text is a sentence-level task (e.g. task: single_label); token_classification "
                    "reads {\"tokens\": [words], \"ner_tags\": [tags]} rows or a .conll file",
                )
            if not isinstance(tokens, list) or not isinstance(tags, list):
                raise FtcliError(
                    f"{where} sentence {number}: '{words}' and '{field}' must be lists of words and of tags",
                    "write each row as {\"tokens\": [words], \"ner_tags\": [tags]}, or use a .conll file",
                )
            if not tokens:
                raise FtcliError(f"{where} sentence {number} is empty", "remove it, or give it its words and tags")
            if len(tokens) != len(tags):
                raise FtcliError(
                    f"{where} sentence {number}: {len(tokens)} words but {len(tags)} tags", "give exactly one tag per word"
                )
        _to_iob2(rows, data, where)

    def check_present(self, rows: list[dict], data: Any, where: str) -> None:
        for number, row in enumerate(rows, start=1):
            if row.get(data.label_field) is None:
                raise FtcliError(f"{where} sentence {number}: '{data.label_field}' is missing or null", "give every word a tag")

    def label_names(self, train: list[dict], data: Any) -> list[str]:
        """O, then each type's B- and I- (whether or not the training tags hold an I-: with
        label_all_subwords a word's later pieces take it); plain tags sorted."""
        if all(isinstance(label_value(tag), int) for row in train for tag in row[data.label_field]):
            raise FtcliError(
                "split 'train': the tags are ids (numbers), and nothing names them",
                "list the tag names in id order in data.label_names, e.g. [O, B-PER, I-PER]",
            )
        tags = {str(tag) for row in train for tag in row[data.label_field]}
        if not is_entity_tagging(tags):
            return sorted(tags)
        return ["O"] + [f"{prefix}-{kind}" for kind in sorted({tag[2:] for tag in tags - {"O"}}) for prefix in ("B", "I")]

    def encode(self, rows: list[dict], data: Any, label_names: list[str], where: str) -> list:
        """A tag id per word: a tag names one of label_names, or (a number: data.label_names or a
        Hub dataset's ClassLabel names them) is its position."""
        index = {name: position for position, name in enumerate(label_names)}
        encoded = []
        for number, row in enumerate(rows, start=1):
            ids = [_tag_id(tag, index) for tag in row[data.label_field]]
            if None in ids:
                unknown = row[data.label_field][ids.index(None)]
                raise FtcliError(
                    f"{where} sentence {number}: tag {unknown!r} is not one of the tags {label_names}",
                    f"fix the tag, or list every tag in data.label_names (ids: 0..{len(label_names) - 1})",
                )
            encoded.append(ids)
        return encoded

    def placeholder_labels(self, rows: list[dict], data: Any, label_names: list[str]) -> list:
        """Tag 0 for each word (rows of words as lists): align_labels then gives the pieces the
        structure labelled words get (IGNORE on later pieces, special tokens and unreported places)."""
        return [[0] * len(row[data.text_fields[0]]) for row in rows]

    def align_labels(
        self, word_labels: list[list[int]], word_ids: list[list[int | None]], data: Any, names: list[str],
        positions: list[list[int]] | None = None,
    ) -> list[list[int]]:
        """Each row's tag ids per sub-token (see `align`). positions: windows' (prepare's
        doc_positions), whose tags are kept only where the window reports the token: a word trains
        once, in the window it is predicted from, its most central one."""
        aligned = [align(ids, tags, names, data.label_all_subwords) for ids, tags in zip(word_ids, word_labels)]
        if positions is None:
            return aligned
        return [[tag if place >= 0 else IGNORE for tag, place in zip(row, places)] for row, places in zip(aligned, positions)]

    def check_training_labels(self, labels: list, label_names: list[str]) -> None:
        if len({tag for sentence in labels for tag in sentence}) < 2:
            raise FtcliError(f"the training set has only one tag ({label_names[0]})", "a tagger needs words of at least two tags")

    def label_counts(self, labels: Any, label_names: list[str]) -> tuple[dict[str, int], dict | None]:
        """Labelled sub-tokens of each tag."""
        found = Counter(int(tag) for sentence in labels for tag in sentence if tag != IGNORE)
        return {name: found.get(index, 0) for index, name in enumerate(label_names)}, None

    def baseline(self, train: Any, validation: Any, summary: dict, label_names: list[str]) -> dict[str, Any] | None:
        return None

    # ---------------------------------------------------------------- objective and decisions

    def objective(self, config: Any, prepared: Any) -> TokenObjective:
        from ftcli.tasks.single_label import class_weights

        # [:] reads the column whole, as data.batching.column does (tasks sit below data, so not that helper).
        labels = prepared.splits["train"]["labels"][:]
        return TokenObjective(
            class_weights(config.training.class_weights, prepared), config.training.label_smoothing, pieces_per_sentence(labels),
        )

    def saved_objective(self, config: Any, decider: Decider) -> TokenObjective:
        return TokenObjective()

    def decider(self, config: Any, saved: np.ndarray | None) -> Decider:
        return Decider(NAME)

    def scores(self, logits: np.ndarray, decider: Decider) -> np.ndarray:
        return softmax(logits)

    def decide(self, scores: np.ndarray, decider: Decider) -> np.ndarray:
        return scores.argmax(-1)

    def prediction_fields(self, decider: Any, names: list[str], scores: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError("a text's entities need its words: row_predictions gives them")

    def row_predictions(self, decider: Any, names: list[str], scores: np.ndarray, tokenized: Any, rows: list[dict], data: Any) -> list[dict[str, Any]]:
        """Each text's entities, as transformers' token-classification pipeline gives them with
        aggregation_strategy="simple" (entity_group, word, start, end, score), decided per word on
        its first piece: the words' characters in the text (a row of words reads as them joined by
        spaces), the entity's score the mean of its words'. A row of words also gets `tags`, one per
        word (null for a word that data.max_length cut)."""
        results = []
        for row_scores, encoded, row in zip(scores, _sentences(tokenized), rows):
            cell = row[data.text_fields[0]]
            text = cell if isinstance(cell, str) else " ".join(cell)
            spans = encoded["spans"] if isinstance(cell, str) else _joined_spans(cell)
            firsts = first_pieces(encoded["word_ids"])
            best = [int(row_scores[position].argmax()) for position in firsts.values()]
            words = [(names[tag], float(row_scores[position][tag]), *spans[word]) for (word, position), tag in zip(firsts.items(), best)]
            result: dict[str, Any] = {"entities": _entity_groups(words, text)}
            if not isinstance(cell, str):
                tags = dict(zip(firsts, best))
                result = {"tags": _word_tags([names[tags[word]] if word in tags else None for word in range(len(cell))], data)} | result
            results.append(result)
        return results

    def example_record(self, names: list[str], scores: np.ndarray, decision: Any, truth: Any, loss: float, data: Any = None) -> dict[str, Any]:
        """One line of predictions_<split>.jsonl, less the words: gold and predicted tags per word,
        in the data's scheme (data.tag_scheme)."""
        (predicted,), (gold,) = words_and_tags([decision], [truth], names)
        scheme = _written_scheme(data)
        return {"gold": from_iob2(gold, scheme), "prediction": from_iob2(predicted, scheme), "loss": loss, "correct": gold == predicted}

    def thresholds_of(self, objective: Any, num_labels: int) -> list[float] | None:
        return None

    # ---------------------------------------------------------------- metrics

    def metric(
        self, name: str, predictions: np.ndarray, references: np.ndarray, num_labels: int = 2, scores: np.ndarray | None = None,
        names: list[str] | None = None,
    ) -> float:
        """Entity-level micro (f1, precision, recall) or macro (f1_macro) scores in strict IOB2; token
        accuracy over the labelled sub-tokens. names: the tags' (ids of plain tags, when not given,
        score as entities of none: F1 0)."""
        kept = references != IGNORE
        if not kept.any():
            return float("nan")
        if name == "accuracy":
            return float(np.mean(predictions[kept] == references[kept]))
        names = names or [f"T{index}" for index in range(num_labels)]
        if not is_entity_tagging(set(names)):  # plain tags (parts of speech): scored per token
            return float(np.mean(predictions[kept] == references[kept]))
        predicted, gold = words_and_tags(predictions, references, names)
        scores_of = entity_scores(predicted, gold)
        return scores_of["macro"]["f1"] if name == "f1_macro" else scores_of["micro"][name]

    def confusion(self, decisions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray | None:
        """Labelled tokens: a row per true tag, a column per predicted one."""
        kept = references != IGNORE
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        np.add.at(confusion, (references[kept].astype(int), decisions[kept].astype(int)), 1)
        return confusion

    # ---------------------------------------------------------------- error analysis

    def error_analysis(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, highest_loss: list[dict]
    ) -> dict[str, Any]:
        """Each entity type's precision, recall, F1 and support, and the highest-loss sentences."""
        predicted, gold = words_and_tags(decisions, labels, label_names)
        per_type = entity_scores(predicted, gold)
        rows = [{"label": kind, **{key: float(value) for key, value in values.items() if key != "support"}, "support": int(values["support"])}
                for kind, values in per_type.items()]
        return {"per_class": rows, "highest_loss": highest_loss[:TOP]}

    def analyse(
        self, label_names: list[str], scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, losses: np.ndarray,
        rows: list[dict] | None = None, tokenized: Any = None, data: Any = None,
    ) -> dict[str, Any]:
        """Each type's scores and the highest-loss sentences, then (entity tags) the entity errors
        by kind, a few of each and the sentences with the most, named with their words."""
        analysis = super().analyse(label_names, scores, decisions, labels, losses)
        if not is_entity_tagging(set(label_names)):
            return analysis  # plain tags: no entities to be wrong about
        predicted, gold = words_and_tags(decisions, labels, label_names)
        words = labelled_words(labels, tokenized, rows, data.text_fields[0] if data is not None else None)
        return analysis | entity_error_analysis(predicted, gold, words)

    def score_findings(self, scores: Mapping[str, Any], config: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Entity precision far from recall (the tagger misses entities, or finds ones the gold does
        not hold), and the types it never gets right (eval_validation.json's per-type F1)."""
        errors = scores.get("errors") or {}
        counts = {row["kind"]: row["count"] for row in errors.get("entity_errors", [])}
        weights = (config.get("training") or {}).get("class_weights")
        findings = []
        precision, recall = scores.get("precision"), scores.get("recall")
        if precision is not None and recall is not None and abs(precision - recall) >= PRECISION_RECALL_GAP:
            findings.append(_skewed(precision, recall, scores.get("f1"), counts, weights))
        unfound = [row for row in errors.get("per_class", []) if row["label"] not in AVERAGES and row["support"] and not row["f1"]]
        if unfound:
            findings.append(_unfound_types(unfound, weights))
        return findings

    # ---------------------------------------------------------------- audit

    def per_example(self, values: Any, tokenized: Any) -> np.ndarray:
        """Each sentence's tags or probabilities per word, read on its first piece (an array per
        sentence, in an array of objects: sentences differ in length)."""
        sentences = np.empty(len(values), dtype=object)
        word_ids = _sentence_word_ids(tokenized)
        for index, (row, ids) in enumerate(zip(values, word_ids)):
            sentences[index] = np.asarray(row)[list(first_pieces(ids).values())]
        return sentences

    def label_issues(self, cleanlab: Any, labels: np.ndarray, scores: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """The sentences holding a word whose tag cleanlab finds probably wrong (confident learning
        per word), the lowest sentence quality (its least likely tag's probability) first, each with
        the words suspected (`positions`), their given and their suggested tags."""
        from cleanlab.token_classification.filter import find_label_issues
        from cleanlab.token_classification.rank import get_label_quality_scores

        given = [[int(tag) for tag in sentence] for sentence in labels]
        probabilities = [np.asarray(sentence, dtype=np.float64) for sentence in scores]
        suspected: dict[int, list[int]] = {}
        for sentence, word in find_label_issues(given, probabilities):
            suspected.setdefault(int(sentence), []).append(int(word))
        quality = get_label_quality_scores(given, probabilities)[0]
        issues = []
        for sentence in sorted(suspected, key=lambda index: (quality[index], index)):
            words = sorted(suspected[sentence])
            issues.append({
                "index": sentence, "positions": words,
                "given": ", ".join(names[given[sentence][word]] for word in words),
                "suggested": ", ".join(names[int(probabilities[sentence][word].argmax())] for word in words),
                "quality": float(quality[sentence]),
            })
        return issues

    def issue_record(self, issue: dict[str, Any], row: dict, text_fields: list[str]) -> dict[str, Any]:
        """The sentence (its words joined by spaces) and the words suspected, each with its place."""
        words = row[text_fields[0]]
        suspected = ", ".join(f"{words[word]} (word {word + 1})" for word in issue["positions"])
        kept = {key: value for key, value in issue.items() if key != "positions"}
        return kept | {text_fields[0]: " ".join(words), "words": suspected}

    def card_description(self, base: str, labels: list[str]) -> str:
        named = ", ".join(f"`{label}`" for label in labels)
        return f"A token classifier (named entities) fine-tuned from {base} with ftcli ({len(labels)} tags: {named})."


# ---------------------------------------------------------------- the diagnosis's findings

# Entity precision and recall this far apart say which way a tagger errs.
PRECISION_RECALL_GAP = 0.15
AVERAGES = ("micro", "macro")  # the per-type table's rows that are no type


def _skewed(precision: float, recall: float, f1: float | None, counts: dict[str, int], weights: Any) -> dict[str, Any]:
    """Recall far below precision: entities missed; precision far below recall: entities the gold does not hold."""
    now = f" (now {weights})" if weights is not None else ""
    evidence = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": None if f1 is None else round(f1, 4)}
    evidence |= {kind.replace(" ", "_"): count for kind, count in counts.items()}
    if recall < precision:
        missed = f"; {counts['missed']} gold entities on validation had no predicted entity overlapping them" if counts else ""
        return {
            "summary": f"Missed entities: entity recall {recall:.3f} is far below precision {precision:.3f}: the tagger "
                       f"leaves entities out (tags their words O) more often than it invents them{missed}.",
            "evidence": evidence,
            "remedies": [
                f"weigh the entity tags up against O: training.class_weights: balanced{now}",
                "train longer: a tagger learns O first and the entities after",
                "check the training tags: entities left O in training teach the tagger to skip them",
            ],
        }
    spurious = (f"; on validation {counts['spurious']} predicted entities overlap no gold one and {counts['wrong boundary']} "
                "have the wrong boundaries") if counts else ""
    return {
        "summary": f"Spurious entities: entity precision {precision:.3f} is far below recall {recall:.3f}: the tagger "
                   f"predicts entities the gold does not hold{spurious}.",
        "evidence": evidence,
        "remedies": [
            "check the validation tags for entities the annotators left O (`ftcli evaluate` lists spurious ones)",
            f"weigh the entity tags less against O{now}" if weights is not None else None,
            "wrong boundaries: check data.tag_scheme matches the files' scheme (iob1, iob2 or bioes)",
        ],
    }


def _unfound_types(rows: list[dict[str, Any]], weights: Any) -> dict[str, Any]:
    """Entity types of which no entity was found right."""
    names = ", ".join(row["label"] for row in rows)
    now = f" (now {weights})" if weights is not None else ""
    return {
        "summary": f"Types never found: no {names} entity on validation was found exactly right (F1 0, "
                   f"{sum(row['support'] for row in rows)} entities).",
        "evidence": {"types": names, "support": [int(row["support"]) for row in rows]},
        "remedies": [
            "more training sentences with these types (`ftcli prepare` shows each tag's count)",
            f"weigh the tags of rarer types up: training.class_weights: balanced{now}" if weights != "balanced" else None,
        ],
    }

def _sentence_word_ids(tokenized: Any) -> list[list[int | None]]:
    """Each sentence's pieces' words, a windowed sentence's windows put back (`_sentences`)."""
    return [sentence["word_ids"] for sentence in _sentences(tokenized)]


def _sentences(tokenized: Any) -> list[dict[str, Any]]:
    """The tokenized rows (word_ids, and spans where a text was split into words) as sentences: a
    windowed split's windows put back at their sentences' places, as `aggregate` puts their scores."""
    rows = list(tokenized)  # a Dataset's rows, or rows already (a server's request)
    if not rows or "doc" not in rows[0]:
        return rows
    sentences: dict[int, dict[str, Any]] = {}
    for row in rows:
        sentence = sentences.setdefault(row["doc"], {"word_ids": [], "spans": row.get("spans")})
        for place, word in zip(row["doc_positions"], row["word_ids"]):
            if place >= 0:
                sentence["word_ids"] += [None] * (place + 1 - len(sentence["word_ids"]))
                sentence["word_ids"][place] = word
    return [sentences[doc] for doc in sorted(sentences)]


def _tag_id(tag: Any, index: dict[str, int]) -> int | None:
    """A tag's id: the position of the name it is, else a number (an id) within the names."""
    if str(tag) in index:
        return index[str(tag)]
    read = label_value(tag)
    return read if isinstance(read, int) and 0 <= read < len(index) else None


def _with_file(where: str, data: Any) -> str:
    """ "split 'train'" with the file it was read from, when local."""
    split = where.partition("'")[2].rstrip("'")
    path = getattr(data, split, None) if split in ("train", "validation", "test") else None
    return f"{where} ({path})" if isinstance(path, str) else where


def _written_scheme(data: Any) -> str:
    """The scheme predictions are written in: the data's when named (auto's tags read as IOB2)."""
    scheme = getattr(data, "tag_scheme", "auto")
    return "iob2" if scheme == "auto" else scheme


def _word_tags(tags: list[str | None], data: Any) -> list[str | None]:
    """A row's tags per word in the data's scheme; a word max_length cut (None) stays None."""
    written = from_iob2([tag or "O" for tag in tags], _written_scheme(data))
    return [None if tag is None else new for tag, new in zip(tags, written)]


def _to_iob2(rows: list[dict], data: Any, where: str) -> None:
    """Entity tags rewritten in IOB2 from data.tag_scheme (auto: detected per file); a sequence
    the scheme does not allow is an error naming the sentence."""
    field = data.label_field
    sentences = [[str(tag) for tag in row[field]] for row in rows]
    if not is_entity_tagging({tag for sentence in sentences for tag in sentence}):
        return
    scheme = detect_scheme(sentences) if data.tag_scheme == "auto" else data.tag_scheme
    if data.tag_scheme == "auto" and scheme != "iob2":  # auto says what it found, and what that means
        log.warning(f"{where}: tags read as {scheme.upper()} (data.tag_scheme: auto), converted to IOB2; "
                    f"set data.tag_scheme: {scheme} to have predictions written in {scheme.upper()} too")
    for number, (row, tags) in enumerate(zip(rows, sentences), start=1):
        converted = to_iob2(tags, scheme)
        if converted is None:
            raise FtcliError(
                f"{where} sentence {number}: tags {' '.join(tags)} are no valid {scheme.upper()} sequence",
                "fix the tags, or set data.tag_scheme to the file's scheme (iob1, iob2 or bioes)",
            )
        row[field] = converted
