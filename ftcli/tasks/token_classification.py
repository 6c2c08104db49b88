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

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcli.errors import FtcliError
from ftcli.tasks.base import TOP, Decider, MetricSpec, Objective, Option, Task
from ftcli.tasks.labels import label_value
from ftcli.tasks.single_label import SingleLabel, softmax

if TYPE_CHECKING:
    import torch

NAME = "token_classification"
IGNORE = -100  # a sub-token the loss and the metrics skip (a word's later pieces, special tokens, padding)
PREFIXES = ("B", "I", "E", "S")
SCHEMES = ("auto", "iob1", "iob2", "bioes")


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


class TokenObjective(Objective):
    """Cross-entropy per labelled sub-token (optionally weighted per tag and smoothed), each
    sentence's mean over its labelled sub-tokens: a sentence's loss, summed over the batch as
    every objective's losses are (so the callers' division by examples gives the mean sentence)."""

    task = NAME

    def __init__(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing

    def to(self, device: torch.device) -> TokenObjective:
        if self.class_weights is None:
            return self
        return TokenObjective(self.class_weights.to(device), self.label_smoothing)

    def _sentence_losses(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, smoothing: float) -> torch.Tensor:
        import torch.nn.functional as F

        per_token = F.cross_entropy(
            logits.float().transpose(1, 2), labels, weight=weight, reduction="none", ignore_index=IGNORE, label_smoothing=smoothing,
        )
        counted = (labels != IGNORE).sum(dim=1)
        return per_token.sum(dim=1) / counted.clamp(min=1)

    def training_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        from ftcli.tasks.tensors import sum_of_real

        return sum_of_real(self._sentence_losses(logits, labels, self.class_weights, self.label_smoothing), real)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.losses(logits, labels).sum()

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._sentence_losses(logits, labels, None, 0.0)

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

    def aggregate(self, logits: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
        raise NotImplementedError("token_classification refuses long_text: window")


# ---------------------------------------------------------------- the task


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
    data_defaults = {"text_fields": ["tokens"], "label_field": "ner_tags", "format": "conll"}
    default_metrics = ("f1", "precision", "recall", "accuracy")
    losses = ("cross_entropy",)
    metrics = {
        "f1": MetricSpec((NAME,), about="entity-level micro F1, strict IOB2 (exact span and type)"),
        "precision": MetricSpec((NAME,), about="entity-level micro precision, strict IOB2"),
        "recall": MetricSpec((NAME,), about="entity-level micro recall, strict IOB2"),
        "accuracy": MetricSpec((NAME,), about="share of labelled tokens whose tag is right"),
        "f1_macro": MetricSpec((NAME,), about="token_classification: entity-level F1 averaged over the types"),
    }
    not_yet = ("export", "serve")
    calibrates = False  # not yet: calibration is skipped, as for regression
    options = (
        *[option for option in SingleLabel.options if option.problem.startswith("training.label_smoothing")],  # read here too
        Option(lambda config: config.data.tag_scheme != "auto", "data.tag_scheme is for task: token_classification, not {task}"),
        Option(lambda config: config.data.label_all_subwords, "data.label_all_subwords is for task: token_classification, not {task}"),
        Option(_conll_file, "CoNLL data (a .conll file, data.format: conll) holds a tag per word: set task: "
               "token_classification, not {task} (or give a jsonl/csv file with one label per text)"),
    )

    def own_problems(self, config: Any) -> list[str]:
        """What token classification does not do (yet), each with the fix."""
        problems = ["lora is not supported for token_classification yet: drop the lora section"] if config.lora else []
        if len(config.data.text_fields) != 1:
            problems.append("token_classification reads one column of words: give one data.text_fields (e.g. [tokens])")
        if config.data.long_text == "window":
            problems.append("token_classification truncates long sentences (long_text: window is not supported): drop data.long_text")
        return problems

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

    def align_labels(self, word_labels: list[list[int]], word_ids: list[list[int | None]], data: Any, names: list[str]) -> list[list[int]]:
        """Each sentence's tag ids per sub-token (see `align`)."""
        return [align(ids, tags, names, data.label_all_subwords) for ids, tags in zip(word_ids, word_labels)]

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

        return TokenObjective(class_weights(config.training.class_weights, prepared), config.training.label_smoothing)

    def saved_objective(self, config: Any, decider: Decider) -> TokenObjective:
        return TokenObjective()

    def decider(self, config: Any, saved: np.ndarray | None) -> Decider:
        return Decider(NAME)

    def scores(self, logits: np.ndarray, decider: Decider) -> np.ndarray:
        return softmax(logits)

    def decide(self, scores: np.ndarray, decider: Decider) -> np.ndarray:
        return scores.argmax(-1)

    def prediction_fields(self, decider: Any, names: list[str], scores: np.ndarray) -> dict[str, Any]:
        raise FtcliError("token_classification is not served yet", "predict with ftcli predict RUN --text ... or --input FILE")

    def row_predictions(self, decider: Any, names: list[str], scores: np.ndarray, tokenized: Any, rows: list[dict], data: Any) -> list[dict[str, Any]]:
        """Each text's entities, as transformers' token-classification pipeline gives them with
        aggregation_strategy="simple" (entity_group, word, start, end, score), decided per word on
        its first piece: the words' characters in the text (a row of words reads as them joined by
        spaces), the entity's score the mean of its words'. A row of words also gets `tags`, one per
        word (null for a word that data.max_length cut)."""
        results = []
        for row_scores, encoded, row in zip(scores, tokenized, rows):
            cell = row[data.text_fields[0]]
            text = cell if isinstance(cell, str) else " ".join(cell)
            spans = encoded["spans"] if isinstance(cell, str) else _joined_spans(cell)
            firsts = first_pieces(encoded["word_ids"])
            best = [int(row_scores[position].argmax()) for position in firsts.values()]
            words = [(names[tag], float(row_scores[position][tag]), *spans[word]) for (word, position), tag in zip(firsts.items(), best)]
            result: dict[str, Any] = {"entities": _entity_groups(words, text)}
            if not isinstance(cell, str):
                tags = dict(zip(firsts, best))
                result = {"tags": [names[tags[word]] if word in tags else None for word in range(len(cell))]} | result
            results.append(result)
        return results

    def example_record(self, names: list[str], scores: np.ndarray, decision: Any, truth: Any, loss: float) -> dict[str, Any]:
        """One line of predictions_<split>.jsonl, less the words: gold and predicted tags per word."""
        (predicted,), (gold,) = words_and_tags([decision], [truth], names)
        return {"gold": gold, "prediction": predicted, "loss": loss, "correct": gold == predicted}

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

    # ---------------------------------------------------------------- audit

    def per_example(self, values: Any, tokenized: Any) -> np.ndarray:
        """Each sentence's tags or probabilities per word, read on its first piece (an array per
        sentence, in an array of objects: sentences differ in length)."""
        sentences = np.empty(len(values), dtype=object)
        for index, (row, word_ids) in enumerate(zip(values, tokenized["word_ids"])):
            sentences[index] = np.asarray(row)[list(first_pieces(word_ids).values())]
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


def _to_iob2(rows: list[dict], data: Any, where: str) -> None:
    """Entity tags rewritten in IOB2 from data.tag_scheme (auto: detected per file); a sequence
    the scheme does not allow is an error naming the sentence."""
    field = data.label_field
    sentences = [[str(tag) for tag in row[field]] for row in rows]
    if not is_entity_tagging({tag for sentence in sentences for tag in sentence}):
        return
    scheme = detect_scheme(sentences) if data.tag_scheme == "auto" else data.tag_scheme
    for number, (row, tags) in enumerate(zip(rows, sentences), start=1):
        converted = to_iob2(tags, scheme)
        if converted is None:
            raise FtcliError(
                f"{where} sentence {number}: tags {' '.join(tags)} are no valid {scheme.upper()} sequence",
                "fix the tags, or set data.tag_scheme to the file's scheme (iob1, iob2 or bioes)",
            )
        row[field] = converted
