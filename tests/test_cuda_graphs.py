"""The CUDA-graph step's arithmetic, run eagerly on the CPU: capture needs a GPU, but what the
graph replays is `_step`, and it must train exactly like the eager loop's step."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import sentiment_rows, write_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftcli.config import DataConfig
from ftcli.cuda_graphs import GraphedTrainStep, length_buckets
from ftcli.data import DeviceTensors, collate, prepare


def test_a_short_batch_fills_its_empty_slots_without_changing_the_step(tmp_path, tiny_model_without_dropout_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_without_dropout_dir)
    rows = write_rows(tmp_path / "train.jsonl", sentiment_rows(10, pair=True))
    split = prepare(DataConfig(train=str(rows), text_fields=["sentence1", "sentence2"]), tokenizer).splits["train"]
    data = DeviceTensors(split, tokenizer.pad_token_id, torch.device("cpu"), pad_to_multiple_of=8)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_without_dropout_dir, num_labels=2)
    eager_model = copy.deepcopy(model)
    # SGD: the update is the gradient itself (AdamW would blow float noise in tiny gradients up to a full step).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.5)

    # Two real rows in a step of four slots, padded to the widest bucket.
    step = GraphedTrainStep(model, optimizer, data, 4, length_buckets(data.width), 1.0, None)
    step._rows.copy_(torch.tensor([7, 2, -1, -1]))
    loss_sum, grad_norm = step._step(data.width)

    batch = collate([split[7], split[2]], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    eager_loss_sum = F.cross_entropy(eager_model(**batch).logits, labels, reduction="sum")
    (eager_loss_sum / 2).backward()
    eager_norm = torch.nn.utils.clip_grad_norm_(eager_model.parameters(), 1.0)
    eager_optimizer.step()

    assert torch.allclose(loss_sum, eager_loss_sum, atol=1e-5)
    assert torch.allclose(grad_norm, eager_norm, atol=1e-5)
    for (name, trained), eager in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.allclose(trained, eager, atol=1e-6), name


def test_buckets_cover_every_length_up_to_the_widest():
    assert length_buckets(104) == [32, 48, 64, 80, 96, 104]
    assert length_buckets(96) == [32, 48, 64, 80, 96]
    assert length_buckets(24) == [24]
