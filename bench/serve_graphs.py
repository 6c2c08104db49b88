"""The serving engine's forward pass, eager against replayed as CUDA graphs (ftcli/serving/graphs.py),
on a MiniLM-shaped BERT classifier with random weights (hidden 384, 6 layers, 12 heads,
intermediate 1536): needs only torch, transformers and ftcli, and a GPU.

    python -m bench.serve_graphs
    python -m bench.serve_graphs --batches 1,8,64 --lengths 32,128 --precision bf16 --repeats 200

Each cell times engine.logits on one padded batch, as the batcher hands it over: token tensors on
the host in, fp32 logits on the host out (the copies and the synchronisation a server pays
included). The two engines take turns, --repeats times each, after a warm-up (the graphed engine
captures its graph there); the medians are reported, with their ratio and the largest difference
between the two engines' logits. Rows are of random lengths between half the padded length and
all of it, so the attention mask is used as a server's batches use it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from ftcli.runtime import Runtime
from ftcli.serving.engines import TorchEngine
from ftcli.serving.graphs import GraphedEngine

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def padded_batch(rows: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tokens, each row between half of `length` and all of it, padded with 0 as the batcher pads."""
    ids = torch.randint(1000, MINILM["vocab_size"], (rows, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def milliseconds(engine, batch: dict[str, torch.Tensor]) -> float:
    started = time.perf_counter()
    engine.logits(batch)  # ends with the logits on the host: the GPU has finished
    return (time.perf_counter() - started) * 1000


def cell(eager: TorchEngine, rows: int, length: int, repeats: int) -> dict[str, float]:
    """One (rows, length): both engines' median ms and the largest logit difference between them."""
    batch = padded_batch(rows, length, torch.Generator().manual_seed(rows * 1000 + length))
    graphed = GraphedEngine(eager, max_batch=rows, max_batch_tokens=rows * length)
    with graphed.capturing():
        graphed.logits(batch)
    if not graphed.cuda_graphs:
        raise SystemExit(f"capture failed: {graphed.failure}")
    for _ in range(5):
        eager.logits(batch), graphed.logits(batch)
    times: dict[str, list[float]] = {"eager": [], "graphed": []}
    for _ in range(repeats):  # turns, so that a clock or load drift slows both alike
        times["eager"].append(milliseconds(eager, batch))
        times["graphed"].append(milliseconds(graphed, batch))
    difference = float(abs(torch.from_numpy(eager.logits(batch)) - torch.from_numpy(graphed.logits(batch))).max())
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians | {"difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64", help="rows per forward pass, comma-separated")
    parser.add_argument("--lengths", default="32,128", help="padded lengths, comma-separated")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16: what ftcli serve runs on a GPU")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a GPU: no CUDA device here")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, **MINILM))
    runtime = Runtime(torch.device("cuda"), torch.bfloat16 if args.precision == "bf16" else None)
    eager = TorchEngine(model, runtime, "random MiniLM-shaped BERT", threads=1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.precision}, median of {args.repeats}")
    print(f"{'rows':>5} {'length':>6} {'eager ms':>9} {'graphed ms':>10} {'speedup':>8} {'max |diff|':>11}")
    for rows in [int(value) for value in args.batches.split(",")]:
        for length in [int(value) for value in args.lengths.split(",")]:
            result = cell(eager, rows, length, args.repeats)
            print(
                f"{rows:>5} {length:>6} {result['eager']:>9.3f} {result['graphed']:>10.3f} "
                f"{result['eager'] / result['graphed']:>7.2f}x {result['difference']:>11.2e}"
            )


if __name__ == "__main__":
    main()
