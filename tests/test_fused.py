"""The graphed step's fused Triton kernels against PyTorch's eager arithmetic.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
torch is imported), on CPU tensors: the same kernel code, program by program.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from test_loop_graphs import eager_step, graphed_and_eager  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification  # noqa: E402

from ftcli.config import LoraConfig, TrainingConfig  # noqa: E402
from ftcli.lora import apply_lora  # noqa: E402
from ftcli.training.loop.fused import BiasGelu, DropoutAddLayerNorm, FusedLayers, fusable_modules  # noqa: E402
from ftcli.training.loop.setup import FUSED_KERNELS_MIN_STEPS, fused_layers  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = {"atol": 2e-2, "rtol": 2e-2}  # one bf16 rounding of values of order 1


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_bias_gelu_matches_pytorch_forward_and_backward():
    torch.manual_seed(0)
    # 70 columns and 3 x 5 rows: neither fills a block, so the masks are exercised.
    x, bias = leaves(torch.randn(3, 5, 70, device=DEVICE).bfloat16(), torch.randn(70, device=DEVICE).bfloat16())
    grad = torch.randn(3, 5, 70, device=DEVICE).bfloat16()
    y = BiasGelu.apply(x, bias)
    y.backward(grad)
    rx, rbias = leaves(x, bias)
    expected = F.gelu(rx + rbias)  # PyTorch's bf16 GELU computes in fp32 too
    expected.backward(grad)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y, expected, **BF16)
    torch.testing.assert_close(x.grad, rx.grad, **BF16)
    torch.testing.assert_close(bias.grad, rbias.grad, atol=5e-2, rtol=2e-2)  # a sum of 15 bf16 values


def layer_norm_inputs(rows: int = 37, width: int = 48):
    torch.manual_seed(1)
    x = torch.randn(rows, width, device=DEVICE).bfloat16()  # the Linear's output under autocast
    bias = torch.randn(width, device=DEVICE).bfloat16()
    residual = torch.randn(rows, width, device=DEVICE)  # the residual stream stays fp32
    weight = 1 + 0.1 * torch.randn(width, device=DEVICE)
    beta = 0.1 * torch.randn(width, device=DEVICE)
    return leaves(x, bias, residual, weight, beta)


def fused_layer_norm(inputs, p: float, seed: int, site: int = 0):
    seed_tensor = torch.tensor([seed], device=DEVICE)
    y = DropoutAddLayerNorm.apply(*inputs, p, 1e-12, seed_tensor, site)
    return y


def eager_layer_norm(inputs, keep_scale=None):
    """BertSelfOutput's arithmetic with a given dropout mask (scaled). The bias is added in fp32,
    as the kernel adds it (under autocast the Linear's epilogue rounds x + bias to bf16 first)."""
    x, bias, residual, weight, beta = inputs
    z = x.float() + bias.float()
    if keep_scale is not None:
        z = z * keep_scale
    return F.layer_norm(z + residual, (x.shape[-1],), weight, beta, 1e-12)


def check_gradients(fused_inputs, eager_inputs):
    for name, fused, eager in zip(("x", "bias", "residual", "weight", "beta"), fused_inputs, eager_inputs):
        assert fused.grad.dtype == fused.dtype, name
        torch.testing.assert_close(fused.grad, eager.grad.to(fused.dtype), atol=5e-2, rtol=2e-2, msg=name)


def test_bias_add_layer_norm_matches_pytorch_without_dropout():
    inputs = layer_norm_inputs()
    grad = torch.randn(37, 48, device=DEVICE)
    y = fused_layer_norm(inputs, p=0.0, seed=0)
    y.backward(grad)
    reference_inputs = leaves(*inputs)
    expected = eager_layer_norm(reference_inputs)
    expected.backward(grad)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    check_gradients(inputs, reference_inputs)


def dropout_mask(inputs, p: float, seed: int, site: int = 0) -> torch.Tensor:
    """The kernel's dropout mask, read back from its gradients: d residual is the LayerNorm's
    input gradient, d x the same times the mask's scale (0 or 1 / (1 - p))."""
    inputs = leaves(*inputs)
    fused_layer_norm(inputs, p, seed, site).backward(torch.randn(inputs[0].shape, device=DEVICE))
    x, _, residual = inputs[:3]
    kept = x.grad != 0
    torch.testing.assert_close(x.grad.float()[kept], residual.grad[kept] / (1 - p), **BF16)
    return kept


def test_dropout_draws_a_mask_from_its_seed_and_site_and_backward_uses_the_same_one():
    p = 0.25
    # 32 rows: on a CPU each row is a program of Triton's interpreter, whose random numbers cost
    # ~20 ms a row; 3,072 draws keep the share test within 3.8 standard deviations (0.0078).
    inputs = layer_norm_inputs(rows=32, width=96)
    kept = dropout_mask(inputs, p, seed=7)
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    assert torch.equal(kept, dropout_mask(inputs, p, seed=7))
    assert not torch.equal(kept, dropout_mask(inputs, p, seed=8))
    assert not torch.equal(kept, dropout_mask(inputs, p, seed=7, site=1))

    grad = torch.randn(32, 96, device=DEVICE)
    y = fused_layer_norm(inputs, p, seed=7)
    y.backward(grad)
    reference_inputs = leaves(*inputs)
    expected = eager_layer_norm(reference_inputs, keep_scale=kept / (1 - p))
    expected.backward(grad)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    check_gradients(inputs, reference_inputs)


def test_fusable_modules_are_the_three_chains_of_each_bert_layer(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    names = [name for name, _ in fusable_modules(model)]
    per_layer = ["attention.output", "intermediate", "output"]
    assert names == [f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in per_layer]
    tanh_gelu = BertForSequenceClassification(BertConfig(**{**model.config.to_dict(), "hidden_act": "gelu_new"}))
    assert all(not name.endswith("intermediate") for name, _ in fusable_modules(tanh_gelu))
    # An adapter on a Linear computes more than the weight's product: that chain stays PyTorch's.
    adapted = apply_lora(model, LoraConfig(r=4, target_modules=["intermediate.dense"]))
    assert [name.split("encoder.")[-1] for name, _ in fusable_modules(adapted)] == [
        f"layer.{i}.{part}" for i in range(2) for part in ("attention.output", "output")
    ]


def test_installed_only_inside_the_context(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).to(DEVICE).eval()
    ids = torch.randint(1000, 2000, (2, 9), device=DEVICE)
    before = model(input_ids=ids).logits
    fused = FusedLayers(model)
    with fused.installed():
        output = model.bert.encoder.layer[0].output
        assert "forward" in vars(output)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)  # eval: no dropout
    assert "forward" not in vars(output)
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the graphed step's CPU tensors need Triton's interpreter")
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_the_graphed_step_with_fused_layers_trains_like_the_eager_step(tmp_path, tiny_model_without_dropout_dir, autocast_dtype):
    step, eager_model, split, pad_token_id = graphed_and_eager(tmp_path, tiny_model_without_dropout_dir, autocast_dtype)
    step.fused = FusedLayers(step.model)
    assert len(step.fused) == 6
    optimizer = torch.optim.SGD([p for p in eager_model.parameters() if p.requires_grad], lr=0.5)
    tolerance = 1e-5 if autocast_dtype is None else 2e-3
    with step.fused.installed():
        for rows in ([7, 2, 5, 1], [0, 3, 8, 9]):
            step._rows.copy_(torch.tensor(rows))
            loss_sum, grad_norm = step._step(step.data.width)
            eager_loss_sum, eager_norm = eager_step(eager_model, optimizer, [split[i] for i in rows], pad_token_id, autocast_dtype)
            torch.testing.assert_close(loss_sum, eager_loss_sum, atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(grad_norm, eager_norm, atol=tolerance, rtol=tolerance)
    for (name, trained), eager in zip(step.model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(trained, eager, atol=tolerance, rtol=tolerance, msg=name)


def test_fused_kernels_auto_fuses_long_runs_only_and_never_without_triton_and_says_why(tiny_model_dir, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    # auto: too short to repay compiling
    assert fused_layers(TrainingConfig(), model, FUSED_KERNELS_MIN_STEPS - 1) == (
        None, f"training.fused_kernels: auto fuses runs of {FUSED_KERNELS_MIN_STEPS} steps or more, this one has 1999",
    )
    fused, why_not = fused_layers(TrainingConfig(), model, FUSED_KERNELS_MIN_STEPS)
    assert len(fused) == 6 and why_not.startswith("the rest runs PyTorch's kernels: only BERT-family")
    assert fused.names() == [f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.output", "intermediate", "output")]
    assert len(fused_layers(TrainingConfig(fused_kernels=True), model, 10)[0]) == 6
    assert fused_layers(TrainingConfig(fused_kernels=False), model, 10**6) == (None, "training.fused_kernels: false")
    fused, why_not = fused_layers(TrainingConfig(fused_kernels=True), torch.nn.Sequential(torch.nn.Linear(4, 4)), 10)
    assert fused is None and why_not.startswith("no BERT-family block to fuse")
    monkeypatch.setitem(sys.modules, "ftcli.training.loop.fused", None)  # as if Triton were missing
    assert fused_layers(TrainingConfig(fused_kernels=True), model, 10) == (None, "Triton is not installed")