"""LoRA: low-rank adapters on the body's layers, the classification head trained in full; QLoRA
(lora.quantize) holds the frozen body in 4 or 8 bits with bitsandbytes, on CUDA only.

A LoRA run keeps two folders: adapter/ (the adapters and the head, a small fraction of the model,
loaded onto the base model by `--adapter`) and model/ (the adapters merged into the base weights:
a plain model that evaluate, predict, export and push use like any other).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ftcli.config import LoraConfig
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.modeling import HEADS, is_decoder, load_model

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# peft's task type of each head (modeling.HEADS): the PeftModel class that wraps it and that adapter_config.json names.
PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


def apply_lora(model: PreTrainedModel, lora: LoraConfig, head: str = "sequence_classification") -> torch.nn.Module:
    """The model wrapped by peft: only the adapters and the head (the model's `head`, modeling.HEADS) are trainable."""
    peft = require("peft", "lora", "lora:")
    settings = peft.LoraConfig(
        task_type=peft.TaskType[PEFT_TASK_TYPES[head]],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or default_target_modules(model, peft),
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


def default_target_modules(model: PreTrainedModel, peft: ModuleType) -> list[str] | None:
    """What lora.target_modules: null adapts. A decoder, or an architecture peft has no choice for
    (ModernBERT): every Linear layer of its body, the attention and MLP projections (Llama's q/k/v/o_proj
    and gate/up/down_proj), as QLoRA does; peft's choice for a decoder is q_proj and v_proj alone. An
    encoder peft knows: None, peft's choice (BERT's query and value)."""
    known = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if is_decoder(model.config) or model.config.model_type not in known:
        return linear_layer_names(model)
    return None


def head_modules(model: PreTrainedModel) -> list[str]:
    """The classification head: the top-level modules with weights outside the pretrained body
    (`classifier` for BERT and ModernBERT, `pre_classifier` and `classifier` for DistilBERT,
    `score` for GPT-2, Llama and Qwen2)."""
    return [
        name
        for name, module in model.named_children()
        if name != model.base_model_prefix and next(module.parameters(), None) is not None
    ]


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    """The names that lora.target_modules can give: the last name part of each Linear layer of the
    body (GPT-2's are transformers' Conv1D)."""
    head = set(head_modules(model))
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name.split(".")[0] not in head
    }
    return sorted(names)


def check_quantize(lora: LoraConfig | None, device: torch.device) -> None:
    """lora.quantize needs CUDA and bitsandbytes: refused in one line before anything imports it."""
    if lora is None or lora.quantize is None:
        return
    if device.type != "cuda":
        raise FtcliError(
            f"lora.quantize: {lora.quantize} needs an NVIDIA GPU (bitsandbytes quantizes on CUDA), and this run trains on {device.type}",
            "remove lora.quantize to train the adapters over full-precision weights here, or train on a CUDA machine",
        )
    require("bitsandbytes", "qlora", f"lora.quantize: {lora.quantize}")


def quantization_config(lora: LoraConfig, head: list[str], compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig for lora.quantize (QLoRA's NF4 with double quantization, or
    LLM.int8). The new head stays out: it is trained in full and saved as trained."""
    if lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=head)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=head,
    )


def head_names(source: str, head: str = "sequence_classification", trust_remote_code: bool = False) -> list[str]:
    """head_modules of the model `source` loads with `head` (modeling.HEADS), found before loading
    it: built on the meta device, which allocates no weights."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return head_modules(HEADS[head].from_config(config, trust_remote_code=trust_remote_code))


def load_quantized_model(
    source: str, label_names: list[str], lora: LoraConfig, trust_remote_code: bool, problem_type: str | None, head: str
) -> PreTrainedModel:
    """The base model for QLoRA: its body quantized onto this process's GPU, its head in fp32, its
    inputs' gradients on (peft's preparation), ready for apply_lora."""
    peft = require("peft", "lora", "lora:")
    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    settings = quantization_config(lora, head_names(source, head, trust_remote_code), compute_dtype)
    model = load_model(source, label_names, trust_remote_code, problem_type, head=head, quantization=settings)
    # ftcli enables gradient checkpointing itself (training.gradient_checkpointing), after the adapters.
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
    adapter_dir: Path, base_source: str, label_names: list[str], trust_remote_code: bool = False,
    problem_type: str | None = None, head: str = "sequence_classification",
) -> torch.nn.Module:
    """The full-precision base model with a saved adapter (and its trained head) on top, ready for inference."""
    peft = require("peft", "lora", f"loading the LoRA adapter in {adapter_dir}")
    base = load_model(base_source, label_names, trust_remote_code, problem_type, head=head)
    with _peft_quietly():
        return peft.PeftModel.from_pretrained(base, str(adapter_dir))


@contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft wraps a model reading is_gradient_checkpointing, which transformers 5 deprecates: nothing for the user to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield
