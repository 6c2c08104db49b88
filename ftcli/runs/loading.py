"""The one way a trained run's model is loaded back: by evaluate, predict, export and serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from ftcli.config import Config, load_config
from ftcli.errors import FtcliError
from ftcli.fileio import damaged_file
from ftcli.lora import is_adapter, load_adapter_model
from ftcli.modeling import load_model, load_tokenizer, pad_like_tokenizer, resolve_model_source
from ftcli.objective import Objective
from ftcli.runs.rundir import RunDir
from ftcli.runs.thresholds import decider_for
from ftcli import tasks


@dataclass
class LoadedRun:
    run: RunDir
    config: Config  # the run's resolved config
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights: Path  # the folder the weights came from: model/, a checkpoint, or adapter/
    is_final: bool  # the final model/ (not a checkpoint or the adapter)
    objective: Objective  # how the model's outputs become predictions (multi_label: with its thresholds)


def load_run(
    run_path: str | Path,
    checkpoint: str | Path | None = None,
    adapter: bool = False,
    device: torch.device | None = None,
) -> LoadedRun:
    """A run's config with its final model (or a checkpoint's, or the base model with the run's
    LoRA adapter) and tokenizer, on `device` (the CPU when not given)."""
    run = RunDir.open(run_path)
    config = load_config(run.config_file)
    if adapter:
        if checkpoint is not None:
            raise FtcliError("--adapter and --checkpoint both choose the weights", "pass one of them")
        if not run.adapter_dir.is_dir():
            raise FtcliError(f"{run.path} has no adapter/", "only runs trained with a lora: section have one")
        checkpoint = run.adapter_dir
    weights = run.require_model(checkpoint)
    tokenizer_path = weights if (weights / "tokenizer_config.json").is_file() else run.model_dir
    # A damaged file is said with what to do about it in this run (the readers below know only the file).
    task = tasks.get(config.task)
    with damaged_file(weights, run.repair_hint):
        tokenizer = load_tokenizer(str(tokenizer_path), config.trust_remote_code)
        if is_adapter(weights):
            model = load_adapter_model(
                weights, resolve_model_source(config.model), _run_label_names(run), config.trust_remote_code,
                task.problem_type, task.model_head,
            )
        else:
            model = load_model(str(weights), trust_remote_code=config.trust_remote_code, head=task.model_head)
        # An adapter's base model is the pretrained one, whose config may name no pad id.
        pad_like_tokenizer(model, tokenizer)
        # The thresholds tuned after training sit beside model/ (an adapter's beside the merged model).
        objective = objective_for_model(config, run.model_dir if adapter else weights)
    if device is not None:
        model = model.to(device)
    return LoadedRun(run, config, model, tokenizer, weights, checkpoint is None, objective)


def _run_label_names(run: RunDir) -> list[str]:
    """The class names an adapter's head was trained on, kept in the config of the run's model/."""
    if not (run.model_dir / "config.json").is_file():
        raise FtcliError(
            f"an adapter needs the label names in {run.model_dir / 'config.json'}, which does not exist",
            "train the run to the end first",
        )
    with damaged_file(run.model_dir / "config.json", run.repair_hint):
        id2label = AutoConfig.from_pretrained(run.model_dir).id2label
    return [id2label[index] for index in sorted(id2label)]


def objective_for_model(config: Config, model_dir: Path) -> Objective:
    """The objective a saved model predicts with: the run's, with the thresholds saved beside it."""
    return tasks.get(config.task).saved_objective(config, decider_for(config, model_dir))
