"""Model FLOPs (ftcli/training/flops.py): the count held against torch's FlopCounterMode on one
step of tiny models, recorded in metrics.json by both backends, and set beside the matmul peak
(bench/flops.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from torch.utils.flop_counter import FlopCounterMode

from ftcli.training.flops import Fed, flop_rates

ROWS, LENGTH = 3, 12


def one_step_flops(model: torch.nn.Module, labels: torch.Tensor) -> int:
    """The matmul FLOPs torch counts in one forward and backward of ROWS x LENGTH tokens."""
    ids = torch.randint(5, 100, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    return counter.get_total_flops()


def counted(model: torch.nn.Module, token_level: bool = False) -> int:
    fed = Fed()
    fed.add(ROWS, LENGTH)
    return flop_rates(model, token_level).flops(fed)


def tiny_bert(model_dir: Path, head: str = "sequence"):
    from transformers import BertForSequenceClassification, BertForTokenClassification

    # Eager attention: two plain matmuls, counted forward and backward as model FLOPs count them
    # (a fused kernel's backward recomputes the scores, which FlopCounterMode counts too).
    cls = BertForSequenceClassification if head == "sequence" else BertForTokenClassification
    return cls.from_pretrained(model_dir, num_labels=2, attn_implementation="eager").train()


def test_the_count_equals_torchs_counter_on_a_tiny_bert_classifier_and_tagger(tiny_model_dir):
    """Exactly, both ways: the classifier's pooler and head once per row, the tagger's head per token."""
    classifier = tiny_bert(tiny_model_dir)
    assert counted(classifier) == one_step_flops(classifier, torch.zeros(ROWS, dtype=torch.long))
    tagger = tiny_bert(tiny_model_dir, head="token")
    assert counted(tagger, token_level=True) == one_step_flops(tagger, torch.zeros(ROWS, LENGTH, dtype=torch.long))


def test_the_count_equals_torchs_counter_on_a_tiny_decoder_with_grouped_query_attention():
    """A Llama classifier: key and value projections narrower than the query's, a head of its own
    size, and the head scoring every position, as transformers' decoders do."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=48, num_labels=2, pad_token_id=0, attn_implementation="eager",
    )
    decoder = LlamaForSequenceClassification(config).train()
    assert counted(decoder) == one_step_flops(decoder, torch.zeros(ROWS, dtype=torch.long))


def test_lora_counts_its_frozen_weights_at_four_and_its_adapters_at_six(tiny_model_dir):
    """LoRA on query and value (peft's choice for BERT), the head trained in full. The count is the
    convention's: frozen weights 4 N per token. torch's counter sees autograd skip, in the first
    layer only, the gradients that nothing below needs (the frozen embeddings'): the query, key and
    value projections' input gradient (2 N each), lora_A's input gradient, and the keys' gradient of
    attention's scores. Everything else agrees exactly. Full fine-tuning costs more."""
    from ftcli.config import LoraConfig
    from ftcli.lora import apply_lora

    full = counted(tiny_bert(tiny_model_dir))
    r, hidden, tokens = 4, 32, ROWS * LENGTH
    model = apply_lora(tiny_bert(tiny_model_dir), LoraConfig(r=r))
    executed = one_step_flops(model, torch.zeros(ROWS, dtype=torch.long))
    skipped = 3 * 2 * hidden * hidden * tokens + 2 * (2 * r * hidden) * tokens + 2 * hidden * LENGTH * tokens
    assert counted(model) - skipped == executed
    assert executed < counted(model) < full


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """One epoch of the tiny BERT (16 steps) under each backend."""
    from ftcli.commands.train import train_run
    from ftcli.config import load_config

    runs = {}
    for backend in ("loop", "trainer"):
        path = write_experiment(tmp_path_factory.mktemp(backend), tiny_model_dir, backend=backend, training={"epochs": 1})
        runs[backend] = train_run(load_config(path)).result.run.path
    return runs


@pytest.mark.parametrize("backend", ["loop", "trainer"])
def test_metrics_json_records_the_model_flops_of_the_tokens_fed_and_their_rate(trained, backend):
    from transformers import AutoModelForSequenceClassification

    train = json.loads((trained[backend] / "metrics.json").read_text())["train"]
    # Every training text of the fixture's data is as long: no padding, so what was fed is known.
    assert train["real_tokens"] == train["padded_tokens"] and train["train_samples"] == 128
    length = train["padded_tokens"] // train["train_samples"]
    fed = Fed()
    for _ in range(train["train_samples"]):
        fed.add(1, length)
    model = AutoModelForSequenceClassification.from_pretrained(trained[backend] / "model")
    assert train["model_flops"] == flop_rates(model, token_level=False).flops(fed) > 0
    assert train["achieved_flops_per_second"] == pytest.approx(train["model_flops"] / train["train_seconds"])


def test_the_benchmark_sets_a_run_beside_the_matmul_peaks(trained, tmp_path):
    from bench import flops

    table = flops.main(["--run", str(trained["loop"]), "--seconds", "0.01", "--size", "64", "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == table
    peak_row = next(line for line in table.splitlines() if line.startswith("| FLOP/s"))
    assert peak_row.count("FLOP/s (n=64)") == 2
    run_row = next(line for line in table.splitlines() if line.startswith("| tiny"))
    cells = run_row.split(" | ")
    assert cells[1] == "fp32" and cells[4].endswith("FLOP/s") and cells[5].endswith("% of fp32 |")
