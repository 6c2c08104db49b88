"""Model FLOPs: the arithmetic a run's training asked of its model, counted from the model's shapes
and the batches fed, so that metrics.json can say how fast the machine did it (achieved FLOP/s).

The count is the usual "model FLOPs" (Kaplan et al. 2020, section 2.1; PaLM's MFU, appendix B):
matmuls only, forward and backward, nothing recomputed (gradient checkpointing's second forward
is the hardware's work, not the model's). For each token fed:

- a trained weight of N numbers: 6 N (forward 2 N; backward 2 N for the gradient of its input and
  2 N for its own);
- a frozen weight (LoRA's and QLoRA's base): 4 N, forward and the gradient of its input, which the
  adapters below it need. Where nothing below needs one, autograd skips it: under LoRA, the first
  layer's projections of the frozen embeddings (and attention's keys there when they have no
  adapter). The executed count is lower by that much (2 N x tokens for each such projection; about
  1/(8 x layers) of the frozen work for BERT), as tests/test_flops.py measures with torch's
  FlopCounterMode; the convention counts the whole layer stack alike;
- attention's two matmuls of activations (scores and weighted values): 12 x layers x width (heads x
  head size) x length, length being the padded one; a causal or sliding-window mask is not
  subtracted (PaLM counts it whole too, and the kernels ftcli runs compute the whole square);
- embedding lookups, norms, activations, the loss: nothing (no matmuls).

An encoder's sequence-level head (BERT's pooler and classifier, DistilBERT's pre_classifier,
ModernBERT's head) reads one position per row: it counts once per row. A decoder's head scores
every position (transformers' ...ForSequenceClassification picks the last afterwards), and a
tagger's tags every token: they count per token.

Tokens count as the backend fed them: padding included, and a CUDA-graph step's empty slots
(metrics.json's padded_tokens), the work the device did; real_tokens / padded_tokens says how much
of it was padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers.pytorch_utils import Conv1D

from ftcli.lora import head_modules
from ftcli.modeling import is_decoder


@dataclass
class Fed:
    """What a backend fed its model in training, padding included: rows, tokens, and the
    query-key pairs of attention (rows x length squared, summed over batches)."""

    rows: int = 0
    tokens: int = 0
    pairs: int = 0

    def add(self, rows: int, length: int) -> None:
        self.rows += rows
        self.tokens += rows * length
        self.pairs += rows * length * length


@dataclass(frozen=True)
class FlopRates:
    """A model's training FLOPs for each row, token and query-key pair fed."""

    per_row: int
    per_token: int
    per_pair: int

    def flops(self, fed: Fed) -> int:
        return self.per_row * fed.rows + self.per_token * fed.tokens + self.per_pair * fed.pairs


def flop_rates(model: torch.nn.Module, token_level: bool) -> FlopRates:
    """The model's FlopRates as it trains now: its matmul weights, trained (6 N) or frozen (4 N),
    per token or, for an encoder's sequence-level head, per row; attention's 12 x layers x width."""
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    config = transformer.config
    per_row_modules: set[str] = set()
    if not token_level and not is_decoder(config):
        per_row_modules = set(head_modules(transformer)) | {f"{transformer.base_model_prefix}.pooler"}
    per_row = per_token = 0
    for name, module in transformer.named_modules():
        size = _matmul_size(module)
        if not size or "original_module" in name.split("."):  # peft's frozen copy of a head it trains: never run
            continue
        cost = (6 if module.weight.requires_grad else 4) * size
        if any(name == head or name.startswith(f"{head}.") for head in per_row_modules):
            per_row += cost
        else:
            per_token += cost
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return FlopRates(per_row, per_token, 12 * config.num_hidden_layers * width)


def _matmul_size(module: torch.nn.Module) -> int:
    """The numbers in a layer's matmul weight (in x out; a 4-bit layer's packed weight has fewer), or 0."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, Conv1D):  # GPT-2's linear layers
        return module.weight.shape[0] * module.weight.shape[1]
    return 0


def all_fed(accelerator: Accelerator, real_tokens: torch.Tensor | int, fed: Fed) -> tuple[int, Fed]:
    """The real tokens and what was fed, summed over every process (each counted its own share)."""
    device = accelerator.device
    mine = torch.as_tensor(real_tokens, device=device).reshape(1)
    counts = torch.cat([mine, torch.tensor([fed.rows, fed.tokens, fed.pairs], device=device)])
    real, rows, tokens, pairs = (int(count) for count in accelerator.reduce(counts))
    return real, Fed(rows, tokens, pairs)
