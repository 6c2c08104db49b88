"""LoRA: low-rank adapters on the encoder's layers, the classification head trained in full.

A LoRA run keeps two folders: adapter/ (the adapters and the head, a small fraction of the model,
loaded onto the base model by `--adapter`) and model/ (the adapters merged into the base weights:
a plain model that evaluate, predict, export and push use like any other).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ftcli.config import LoraConfig
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.modeling import load_model

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> torch.nn.Module:
    """The model wrapped by peft: only the adapters and the head are trainable."""
    peft = require("peft", "lora", "lora:")
    settings = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        # The head starts from random weights and is small: train all of it, and save it with the adapters.
        modules_to_save=head_modules(model),
    )
    try:
        with _peft_quietly():
            return peft.get_peft_model(model, settings)
    except ValueError as error:  # peft's word for target modules it cannot find or does not know
        raise FtcliError(
            f"lora: {str(error).splitlines()[0]}",
            f"set lora.target_modules to some of: {', '.join(linear_layer_names(model))}",
        ) from None


def head_modules(model: PreTrainedModel) -> list[str]:
    """The classification head: the top-level modules with weights outside the pretrained body
    (`classifier` for BERT, `pre_classifier` and `classifier` for DistilBERT, `score` for GPT-2)."""
    return [
        name
        for name, module in model.named_children()
        if name != model.base_model_prefix and next(module.parameters(), None) is not None
    ]


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    """The names that lora.target_modules can give: the last name part of each Linear layer of the body."""
    head = set(head_modules(model))
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in head
    }
    return sorted(names)


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    """The base model with the adapters folded into its weights and the trained head in place."""
    return model.merge_and_unload()


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file()


def load_adapter_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a LoRA checkpoint (the adapters and the head, as peft saves them) into a LoRA-wrapped model."""
    peft = require("peft", "lora", f"loading the LoRA checkpoint {path}")
    # The checkpoint holds the trained weights alone: the frozen base weights are all 'missing', as they should be.
    unexpected = peft.set_peft_model_state_dict(model, load_file(path / ADAPTER_WEIGHTS_FILE)).unexpected_keys
    if unexpected:
        raise FtcliError(
            f"the adapter in {path} does not fit the model (unexpected {unexpected[:3]})",
            "resume with the config the run was trained with",
        )


def load_adapter_model(
    adapter_dir: Path, base_source: str, label_names: list[str], trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base model with a saved adapter (and its trained head) on top, ready for inference."""
    peft = require("peft", "lora", f"loading the LoRA adapter in {adapter_dir}")
    base = load_model(base_source, label_names, trust_remote_code)
    with _peft_quietly():
        return peft.PeftModel.from_pretrained(base, str(adapter_dir))


@contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft wraps a model reading is_gradient_checkpointing, which transformers 5 deprecates: nothing for the user to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield
