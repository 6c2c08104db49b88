"""Triton kernels for the elementwise chains around BERT's Linear layers, for the graphed step.

A graphed bert-base step at batch 8 is GPU-bound on about 850 small kernels. Around each
feed-forward and attention-output Linear, PyTorch runs a chain of them, each reading and writing
the whole activation: forward, dropout, the residual add and LayerNorm (three kernels) or GELU;
backward, LayerNorm's two, a cast, dropout's mask, GELU's and the bias gradient's reduction over
every row. Here each chain is one kernel forward and one backward (plus a small reduction of
per-block partial sums, so the bias and LayerNorm gradients are summed in a fixed order and the
step stays deterministic):

- bias + GELU (erf), the intermediate Linear's epilogue;
- bias + dropout + residual + LayerNorm, the attention-output and output Linears' epilogue.

The Linear itself runs without its bias (the kernel adds it). Dropout draws its mask from Philox
keyed by a seed tensor that the step draws from PyTorch's CUDA generator: replays draw new masks,
and a resumed run, whose generator state is restored, draws the masks the uninterrupted run drew.
Backward draws the same mask again instead of storing it.

The fused forwards are installed only while the step is captured (`FusedLayers` is a context):
evaluation, saving and an eager step use the model's own modules.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

# A transformers family whose SelfOutput/Output/Intermediate modules are BERT's (they are
# "Copied from" modeling_bert), so their forwards are the chains fused here.
BERT_FAMILIES = ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra")
# Tiles of the GELU kernels: partial bias sums are a [M / _GELU_ROWS, N] buffer, summed by one
# more kernel. Chosen, not tuned side by side (bench/RESULTS.md).
_GELU_ROWS, _GELU_COLUMNS = 8, 256
_LAYER_NORM_PROGRAMS = 256  # programs of the LayerNorm backward, each summing its rows' partials


# ---------------------------------------------------------------- kernels
@triton.jit
def _bias_gelu_forward(x_ptr, bias_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    inside = (rows < M) & (cols < N)
    z = tl.load(x_ptr + rows * N + cols, mask=inside).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=cols < N).to(tl.float32)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + rows * N + cols, y, mask=inside)


@triton.jit
def _bias_gelu_backward(
    grad_ptr, x_ptr, bias_ptr, dx_ptr, partial_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    inside = (rows < M) & (cols < N)
    z = tl.load(x_ptr + rows * N + cols, mask=inside).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=cols < N).to(tl.float32)
    grad = tl.load(grad_ptr + rows * N + cols, mask=inside).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dz = tl.where(inside, grad * (cdf + z * pdf), 0.0)
    tl.store(dx_ptr + rows * N + cols, dz, mask=inside)
    tl.store(partial_ptr + tl.program_id(0) * N + cols, tl.sum(dz, axis=0)[None, :], mask=cols < N)


@triton.jit
def _dropped(x_ptr, bias_ptr, row, cols, inside, N, p, seed, HAS_DROPOUT: tl.constexpr):
    """(x + bias) with dropout applied, for one row; and each element's scale: 0 where dropped,
    1 / (1 - p) where kept."""
    z = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, row * N + cols) >= p
        scale = tl.where(keep, 1.0 / (1.0 - p), 0.0)
    else:
        scale = tl.where(inside, 1.0, 0.0)
    return z * scale, scale


@triton.jit
def _dropout_add_layer_norm_forward(
    x_ptr, bias_ptr, residual_ptr, weight_ptr, beta_ptr, y_ptr, mean_ptr, rstd_ptr, seed_ptr,
    N, p, eps, site, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    seed = tl.load(seed_ptr) + site
    z, _ = _dropped(x_ptr, bias_ptr, row, cols, inside, N, p, seed, HAS_DROPOUT)
    h = z + tl.load(residual_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    centred = tl.where(inside, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=inside).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=inside).to(tl.float32)
    tl.store(y_ptr + row * N + cols, centred * rstd * weight + beta, mask=inside)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _dropout_add_layer_norm_backward(
    grad_ptr, x_ptr, bias_ptr, residual_ptr, weight_ptr, mean_ptr, rstd_ptr, seed_ptr,
    dx_ptr, dresidual_ptr, partial_ptr, M, N, rows_per_program, p, site,
    HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    seed = tl.load(seed_ptr) + site
    weight = tl.load(weight_ptr + cols, mask=cols < N).to(tl.float32)
    dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = tl.program_id(0) * rows_per_program + i
        inside = cols < tl.where(row < M, N, 0)  # the last program's rows past M: nothing
        z, scale = _dropped(x_ptr, bias_ptr, row, cols, inside, N, p, seed, HAS_DROPOUT)
        h = z + tl.load(residual_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + tl.minimum(row, M - 1))
        rstd = tl.load(rstd_ptr + tl.minimum(row, M - 1))
        normed = tl.where(inside, (h - mean) * rstd, 0.0)
        grad = tl.load(grad_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        scaled = grad * weight
        dh = (scaled - normed * (tl.sum(normed * scaled, axis=0) / N) - tl.sum(scaled, axis=0) / N) * rstd
        dh = tl.where(inside, dh, 0.0)
        tl.store(dresidual_ptr + row * N + cols, dh, mask=inside)
        tl.store(dx_ptr + row * N + cols, dh * scale, mask=inside)
        dweight += grad * normed
        dbeta += grad
        dbias += dh * scale
    partial = partial_ptr + tl.program_id(0) * 3 * N + cols
    tl.store(partial, dweight, mask=cols < N)
    tl.store(partial + N, dbeta, mask=cols < N)
    tl.store(partial + 2 * N, dbias, mask=cols < N)


@triton.jit
def _sum_rows(partial_ptr, out_ptr, G, C, row_stride, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over g of partial[g, c], a column block per program, BLOCK_G rows at a time:
    a fixed order of additions, so the gradients are the same at every run (atomic adds would not be)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)[:, None]
        inside = (rows < G) & (cols[None, :] < C)
        total += tl.sum(tl.load(partial_ptr + rows * row_stride + cols[None, :], mask=inside, other=0.0), axis=0)
    tl.store(out_ptr + cols, total, mask=cols < C)


def _column_sums(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    groups, columns = partial.shape
    out = torch.empty(columns, dtype=dtype, device=partial.device)
    block_g = min(256, triton.next_power_of_2(groups))
    block_c = max(16, min(128, 8192 // block_g))  # a tile of at most 8,192 values
    _sum_rows[(triton.cdiv(columns, block_c),)](
        partial, out, groups, columns, partial.stride(0), BLOCK_G=block_g, BLOCK_C=block_c, num_warps=8
    )
    return out


# ---------------------------------------------------------------- autograd
def _rows_and_width(x: torch.Tensor) -> tuple[int, int]:
    """x of shape [..., N] as the kernels see it: M rows of N values."""
    return x.numel() // x.shape[-1], x.shape[-1]


class BiasGelu(torch.autograd.Function):
    """gelu(x + bias) for x of shape [..., N], in x's dtype; computed in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        m, n = _rows_and_width(x)
        y = torch.empty_like(x)
        _bias_gelu_forward[(triton.cdiv(m, _GELU_ROWS), triton.cdiv(n, _GELU_COLUMNS))](
            x, bias, y, m, n, BLOCK_M=_GELU_ROWS, BLOCK_N=_GELU_COLUMNS
        )
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, bias = ctx.saved_tensors
        m, n = _rows_and_width(x)
        dx = torch.empty_like(x)
        partial = torch.empty(triton.cdiv(m, _GELU_ROWS), n, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, _GELU_ROWS), triton.cdiv(n, _GELU_COLUMNS))
        _bias_gelu_backward[grid](
            grad.contiguous(), x, bias, dx, partial, m, n, BLOCK_M=_GELU_ROWS, BLOCK_N=_GELU_COLUMNS
        )
        return dx, _column_sums(partial, bias.dtype)


class DropoutAddLayerNorm(torch.autograd.Function):
    """LayerNorm(dropout(x + bias) + residual), computed in fp32 per row. The output takes the
    dtype eager PyTorch gives it (under autocast LayerNorm runs in fp32)."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, beta, p: float, eps: float, seed: torch.Tensor, site: int):
        x, residual = x.contiguous(), residual.contiguous()
        m, n = _rows_and_width(x)
        dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _dropout_add_layer_norm_forward[(m,)](
            x, bias, residual, weight, beta, y, mean, rstd, seed, n, p, eps, site,
            HAS_DROPOUT=p > 0, BLOCK_N=triton.next_power_of_2(n),
        )
        ctx.save_for_backward(x, bias, residual, weight, mean, rstd, seed)
        ctx.p, ctx.site = p, site
        return y

    @staticmethod
    def backward(ctx, grad):
        x, bias, residual, weight, mean, rstd, seed = ctx.saved_tensors
        m, n = _rows_and_width(x)
        rows_per_program = triton.cdiv(m, _LAYER_NORM_PROGRAMS)
        programs = triton.cdiv(m, rows_per_program)
        dx = torch.empty_like(x)
        dresidual = torch.empty_like(residual)
        partial = torch.empty(programs, 3 * n, dtype=torch.float32, device=x.device)
        _dropout_add_layer_norm_backward[(programs,)](
            grad.contiguous(), x, bias, residual, weight, mean, rstd, seed, dx, dresidual, partial,
            m, n, rows_per_program, ctx.p, ctx.site, HAS_DROPOUT=ctx.p > 0, BLOCK_N=triton.next_power_of_2(n),
        )
        norm_grads = _column_sums(partial[:, : 2 * n], weight.dtype)
        dbias = _column_sums(partial[:, 2 * n :], bias.dtype)
        return dx, dbias, dresidual, norm_grads[:n], norm_grads[n:], None, None, None, None


# ---------------------------------------------------------------- the model's layers
def _family_module(module: nn.Module, suffix: str) -> bool:
    return type(module).__name__ in {family + suffix for family in BERT_FAMILIES}


def _is_exact_gelu(activation: nn.Module) -> bool:
    return type(activation).__name__ == "GELUActivation" and getattr(activation, "act", None) is F.gelu


def fusable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose forward a fused one replaces: BERT's attention-output and output blocks
    (dense, dropout, residual, LayerNorm) and its intermediate blocks with exact GELU."""
    found = []
    for name, module in model.named_modules():
        # A plain Linear with a bias: an adapter (LoRA) wrapping it computes more than its weight's product.
        plain = type(getattr(module, "dense", None)) is nn.Linear and module.dense.bias is not None
        if plain and (_family_module(module, "SelfOutput") or _family_module(module, "Output")):
            if module.LayerNorm.bias is not None:
                found.append((name, module))
        elif plain and _family_module(module, "Intermediate") and _is_exact_gelu(module.intermediate_act_fn):
            found.append((name, module))
    return found


def _output_forward(module: nn.Module, seed: torch.Tensor, site: int):
    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        return DropoutAddLayerNorm.apply(
            F.linear(hidden_states, self.dense.weight), self.dense.bias, input_tensor,
            self.LayerNorm.weight, self.LayerNorm.bias, p, self.LayerNorm.eps, seed, site,
        )

    return types.MethodType(forward, module)


def _intermediate_forward(module: nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return BiasGelu.apply(F.linear(hidden_states, self.dense.weight), self.dense.bias)

    return types.MethodType(forward, module)


class FusedLayers:
    """The fused forwards of a model's BERT blocks, installed while the context is open.

    Each dropout site gets its own Philox stream: the step's seed plus the site's number.
    `draw_seed` draws the step's seed from the CUDA generator, as a kernel the graph captures.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = fusable_modules(model)
        self.seed = torch.zeros(1, dtype=torch.int64, device=next(model.parameters()).device)

    def __len__(self) -> int:
        return len(self.modules)

    def names(self) -> list[str]:
        """The fused modules' names in the model (metrics.json's kernels record)."""
        return [name for name, _ in self.modules]

    def draw_seed(self) -> None:
        # Sites add at most len(modules) to the seed: stay below int64's range, far below 2**62.
        torch.randint(0, 2**62, (1,), device=self.seed.device, out=self.seed)

    @contextmanager
    def installed(self) -> Iterator[None]:
        for site, (_, module) in enumerate(self.modules):
            if _family_module(module, "Intermediate"):
                module.forward = _intermediate_forward(module)
            else:
                module.forward = _output_forward(module, self.seed, site)
        try:
            yield
        finally:
            for _, module in self.modules:
                del module.forward  # the class's forward again
