"""A student cut from its teacher (`ftcli distill RUN --student layers:K`): the teacher's own trained
model with K of its N transformer layers, evenly spaced as DistilBERT was initialised from BERT,
and every other weight (embeddings, final norm, head) as trained: nothing to download, and a start
that already computes something close to the teacher's function."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json
from ftcli.modeling import WEIGHT_FILES, load_model, load_tokenizer, resolve_model_source, save_model

# Written into the student's folder after the model: the teacher files and K it was built from.
STAMP_FILE = "student.json"
# Config lists with one entry per layer (the kind of attention or MLP, RoPE per layer, heads per
# layer): the student keeps its kept layers' entries, so a reload builds each layer as it was.
PER_LAYER_LISTS = (
    "layer_types", "mlp_layer_types", "no_rope_layers", "layer_rope_theta", "layers_block_type",
    "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
)
_SPEC = re.compile(r"layers:(.*)")
_SPEC_HINT = "give the number of the teacher's layers to keep, e.g. --student layers:3"


def parse_student(spec: str) -> int | None:
    """The K of `layers:K`; None for anything else (a model name or folder to distill into)."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        return None
    count = match.group(1).strip()
    if not re.fullmatch(r"[0-9]+", count) or int(count) < 1:
        raise FtcliError(f"--student {spec}: the number of layers to keep must be a whole number of 1 or more", _SPEC_HINT)
    return int(count)


def kept_layers(total: int, keep: int) -> list[int]:
    """Which `keep` of `total` layers a student keeps, evenly spaced from the first to the last:
    round(i * (total - 1) / (keep - 1)), Python's round taking a half to the even index (6 keep 3 is
    [0, 2, 5]; 12 keep 6 is [0, 2, 4, 7, 9, 11]). One layer is the first: every longer choice starts
    there, and some families build their first layer unlike the others (ModernBERT's has no
    attention norm: the embeddings end in one), so only the first fits the student's first place."""
    if keep >= total:
        raise FtcliError(
            f"the teacher has only {total} layers; choose layers:K with K < {total}",
            f"e.g. --student layers:{max(1, total // 2)}",
        )
    if keep < 1:
        raise FtcliError(f"a student needs at least 1 layer, not {keep}", _SPEC_HINT)
    if keep == 1:
        return [0]
    step = (total - 1) / (keep - 1)
    return [round(index * step) for index in range(keep)]


def build_student(teacher_model_dir: Path, keep: int, target: Path, head: str) -> dict[str, Any]:
    """Save into `target` the teacher's model (its `head`, modeling.HEADS) with `keep` of its
    layers, with its tokenizer; returns what the run records: {"from", "layers", "of",
    "parameters"}. A target already built from these teacher files with this K is kept as it is."""
    stamp = {"teacher": _teacher_files(teacher_model_dir), "keep": keep, "head": head}
    record = _built_before(target, stamp)
    if record is not None:
        return record
    source = resolve_model_source(str(teacher_model_dir))
    model = load_model(source, head=head)
    total = model.config.num_hidden_layers
    kept = kept_layers(total, keep)
    cut_layers(model, kept)
    save_model(model, load_tokenizer(source), target)
    record = {
        "from": str(teacher_model_dir), "layers": kept, "of": total,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }
    # Last, after the model is in place: a stamp is never beside a half-built student.
    atomic_write_json(target / STAMP_FILE, stamp | {"record": record})
    return record


def cut_layers(model: PreTrainedModel, kept: list[int]) -> None:
    """Keep only the layers `kept` of the model's stack, in order, and make its config say so."""
    config = model.config
    total = config.num_hidden_layers  # DistilBERT's n_layers under the common name
    parent, name, stack = _layer_stack(model, total)
    students = torch.nn.ModuleList(stack[index] for index in kept)
    setattr(parent, name, students)
    for position, layer in enumerate(students):
        # A decoder's attention finds its key/value cache by layer_idx; ModernBERT's layers carry it too.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config.num_hidden_layers = len(kept)
    # A layer's kind (ModernBERT's global or local attention, chosen from its id: every third is
    # global; Qwen2's and Gemma's sliding windows) was fixed when the teacher built it (its
    # attention_type and window), so the kept module keeps its own kind; the config's per-layer
    # lists keep the kept layers' entries, so that a reload builds each layer of that same kind.
    for key in PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == total:
            setattr(config, key, [values[index] for index in kept])
    _check_rebuilds(model)


def _layer_stack(model: PreTrainedModel, total: int) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The model's one list of `total` modules (its transformer layers), its parent and name."""
    stacks = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList) and len(module) == total
    ]
    if len(stacks) != 1:
        found = "none" if not stacks else f"{len(stacks)} ({', '.join(stacks)})"
        raise FtcliError(
            f"cannot find {type(model).__name__}'s stack of {total} layers to cut a student from: lists of {total} modules: {found}",
            "distill into a smaller model of your own instead: --student MODEL",
        )
    parent_name, _, name = stacks[0].rpartition(".")
    return model.get_submodule(parent_name), name, model.get_submodule(stacks[0])


def _check_rebuilds(model: PreTrainedModel) -> None:
    """Refuse a student its config would not rebuild: a family whose layers differ by position in
    ways no per-layer list says (a first layer built unlike the others, MoE layers at listed
    indices) would load with weights dropped or fresh."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    expected = {key: tuple(tensor.shape) for key, tensor in fresh.state_dict().items()}
    if shapes != expected:
        differing = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
        raise FtcliError(
            f"{type(model).__name__} cannot be cut by layers: a model of the student's config has other weights "
            f"({', '.join(key for key, _ in differing)})",
            "distill into a smaller model of your own instead: --student MODEL",
        )


def _teacher_files(folder: Path) -> dict[str, list[int]]:
    """The teacher's config and weight files, each with its size and modification time: a
    retrained or recalibrated teacher has other ones."""
    if not folder.is_dir():
        return {}
    return {
        path.name: [path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(folder.iterdir())
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name == "config.json")
    }


def _built_before(target: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The record of the student in `target` when it was built from `stamp`'s teacher files and K."""
    try:
        saved = json.loads((target / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: build it again
        return None
    if not isinstance(saved, dict) or {key: saved.get(key) for key in stamp} != stamp or not stamp["teacher"]:
        return None
    if not any((target / name).is_file() for name in WEIGHT_FILES):  # the stamp outlived the weights
        return None
    return saved.get("record")
