"""One process of tests/test_cuda_graphs.py's two-process check, started by torchrun:
the graphed step's function run eagerly on this process's share of a batch (gloo all-reduce).

    python -m torch.distributed.run --nproc_per_node 2 tests/graph_step_worker.py MODEL_DIR ROWS OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftcli.config import DataConfig
from ftcli.cuda_graphs import GraphedTrainStep, length_buckets
from ftcli.data import DeviceTensors, prepare

# Five real rows of one global batch: three on the first process, two (and an empty slot) on the second.
SHARES = [[7, 2, 5], [1, 4, -1]]


def build_step(model_dir: str, rows_file: str, slots: int) -> tuple[GraphedTrainStep, DeviceTensors]:
    """The tiny model under SGD (the update is the gradient itself), ready to step on `slots` rows."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = prepare(DataConfig(train=rows_file, text_fields=["sentence1", "sentence2"]), tokenizer, use_cache=False)
    data = DeviceTensors(split.splits["train"], tokenizer.pad_token_id, torch.device("cpu"), pad_to_multiple_of=8)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return GraphedTrainStep(model, optimizer, data, slots, length_buckets(data.width), 1.0, None), data


def main() -> None:
    model_dir, rows_file, out_dir = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    step, data = build_step(model_dir, rows_file, slots=3)
    step._rows.copy_(torch.tensor(SHARES[rank]))
    loss_sum, grad_norm = step._step(data.width)
    torch.save(
        {"loss_sum": loss_sum, "grad_norm": grad_norm, "weights": step.model.state_dict()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
