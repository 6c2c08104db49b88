"""The CUDA-graph step's arithmetic, run eagerly on the CPU: capture needs a GPU, but what the
graph replays is `_step`, and it must train exactly like the eager loop's step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_rows, write_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftcli.config import DataConfig, LoraConfig
from ftcli.training.loop.graphs import GraphedTrainStep, length_buckets
from ftcli.data.batching import DeviceTensors, collate
from ftcli.data.prepare import prepare
from ftcli.lora import apply_lora
from ftcli.modeling import enable_gradient_checkpointing
from ftcli.tasks.single_label import SingleLabelObjective


def graphed_and_eager(tmp_path, model_dir, autocast_dtype, adapt=lambda model: model):
    """A GraphedTrainStep over 10 training pairs and an identical eager model, both with SGD (the
    update is the gradient itself; AdamW would blow float noise in tiny gradients up to a full step)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = write_rows(tmp_path / "train.jsonl", sentiment_rows(10, pair=True))
    split = prepare(DataConfig(train=str(rows), text_fields=["sentence1", "sentence2"]), tokenizer, "single_label").splits["train"]
    data = DeviceTensors(split, tokenizer.pad_token_id, torch.device("cpu"), pad_to_multiple_of=8)
    torch.manual_seed(0)
    model = adapt(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2))
    eager_model = copy.deepcopy(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    step = GraphedTrainStep(model, torch.optim.SGD(trained, lr=0.5), data, 4, length_buckets(data.width), 1.0, autocast_dtype, SingleLabelObjective())
    return step, eager_model, split, tokenizer.pad_token_id


def eager_step(model, optimizer, examples, pad_token_id, autocast_dtype=None):
    """The eager loop's step: summed loss, its gradient the mean, clipped to norm 1."""
    batch = collate(examples, pad_token_id)
    labels = batch.pop("labels")
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss_sum = F.cross_entropy(model(**batch).logits.float(), labels, reduction="sum")
    (loss_sum / len(examples)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss_sum, norm


def assert_same_weights(model, eager_model):
    for (name, trained), eager in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.allclose(trained, eager, atol=1e-6), name


def test_a_short_batch_fills_its_empty_slots_without_changing_the_step(tmp_path, tiny_model_without_dropout_dir):
    step, eager_model, split, pad_token_id = graphed_and_eager(tmp_path, tiny_model_without_dropout_dir, None)
    # Two real rows in a step of four slots, padded to the widest bucket.
    step._rows.copy_(torch.tensor([7, 2, -1, -1]))
    loss_sum, grad_norm = step._step(step.data.width)

    optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.5)
    eager_loss_sum, eager_norm = eager_step(eager_model, optimizer, [split[7], split[2]], pad_token_id)

    assert torch.allclose(loss_sum, eager_loss_sum, atol=1e-5)
    assert torch.allclose(grad_norm, eager_norm, atol=1e-5)
    assert_same_weights(step.model, eager_model)


def lora(model):
    return apply_lora(model, LoraConfig(r=4, dropout=0.0))


@pytest.mark.parametrize("variant", ["full", "gradient_checkpointing", "lora"])
def test_low_precision_copies_train_exactly_like_autocast(tmp_path, tiny_model_without_dropout_dir, variant):
    adapt = lora if variant == "lora" else lambda model: model
    step, eager_model, split, pad_token_id = graphed_and_eager(tmp_path, tiny_model_without_dropout_dir, torch.bfloat16, adapt)
    if variant == "gradient_checkpointing":  # backward recomputes the forward: its gradients must still reach the copies
        enable_gradient_checkpointing(step.model)
        enable_gradient_checkpointing(eager_model)
    trained_linear_parameters = sum(
        parameter.requires_grad
        for module in step.model.modules()
        if isinstance(module, torch.nn.Linear)
        for parameter in module.parameters(recurse=False)
    )
    assert len(step._copies) == trained_linear_parameters > 0
    optimizer = torch.optim.SGD([p for p in eager_model.parameters() if p.requires_grad], lr=0.5)
    # Two steps: the second runs on the copies the first step's update refreshed.
    for rows in ([7, 2, 5, 1], [0, 3, 8, 9]):
        step._rows.copy_(torch.tensor(rows))
        loss_sum, grad_norm = step._step(step.data.width)
        eager_loss_sum, eager_norm = eager_step(eager_model, optimizer, [split[i] for i in rows], pad_token_id, torch.bfloat16)
        assert torch.allclose(loss_sum, eager_loss_sum, atol=1e-5)
        assert torch.allclose(grad_norm, eager_norm, atol=1e-5)
    assert_same_weights(step.model, eager_model)
    for parameter, low_precision in step._copies.values():
        assert torch.equal(low_precision, parameter.to(torch.bfloat16))


def test_buckets_cover_every_length_up_to_the_widest():
    assert length_buckets(104) == [32, 48, 64, 80, 96, 104]
    assert length_buckets(96) == [32, 48, 64, 80, 96]
    assert length_buckets(24) == [24]
