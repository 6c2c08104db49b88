"""The push command: a run's model, with a model card written from the run, to the Hub in one commit.

The card (README.md) is built in memory from config.yaml, metrics.json and env.json, beside
curves.png: pushing writes nothing into the run directory, so a failed upload leaves it as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ftcli import hub
from ftcli.config import Config, load_config
from ftcli.errors import FtcliError
from ftcli.fileio import read_json
from ftcli.modeling import PACKAGED_MODELS
from ftcli.reporting.formatting import format_value
from ftcli.runs.rundir import RunDir
from ftcli import tasks

AGAIN = "the run directory is unchanged; push it later with: ftcli push RUN_DIR REPO_ID"
# The Hub model behind each packaged alias, for the card's base_model.
PACKAGED_BASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
SPLIT_ORDER = ("validation", "test", "train")


def check_hub_access() -> None:
    """Fail early, naming the fix, when an upload cannot work: the Hub off limits, or no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise FtcliError("cannot push: HF_HUB_OFFLINE is set, so ftcli stays off the Hugging Face Hub", f"unset HF_HUB_OFFLINE; {AGAIN}")
    if hub.offline():
        raise FtcliError("cannot push: the Hugging Face Hub does not answer", f"check the network; {AGAIN}")
    if get_token() is None:
        raise FtcliError("cannot push: no Hugging Face token", f"log in with `hf auth login` or set HF_TOKEN; {AGAIN}")


def push_run(run_path: str | Path | RunDir, repo_id: str, private: bool = True) -> str:
    """Upload model/ (and adapter/ for a LoRA run), the model card and curves.png; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run = run_path if isinstance(run_path, RunDir) else RunDir.open(run_path)
    config = load_config(run.config_file)
    model_dir = run.require_model()
    check_hub_access()
    uploads = {path.relative_to(model_dir).as_posix(): path for path in _files(model_dir)}
    if run.adapter_dir.is_dir():
        uploads |= {f"adapter/{path.relative_to(run.adapter_dir).as_posix()}": path for path in _files(run.adapter_dir)}
    if run.curves_png.is_file():
        uploads["curves.png"] = run.curves_png
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in uploads.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(run, config, repo_id).encode()))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=f"ftcli: upload run {config.name}")
    except Exception as error:  # network, permissions, quota: every failure is the user's to fix, and nothing is lost
        raise FtcliError(f"pushing {run.path} to {repo_id} failed: {str(error).splitlines()[0]}", AGAIN) from None
    return commit.commit_url


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


# ---------------------------------------------------------------- the model card


def model_card(run: RunDir, config: Config, repo_id: str) -> str:
    """README.md for the Hub: metadata, results, training summary, curves, usage and the full config."""
    metrics = run.read_metrics()
    env = read_json(run.env_file, run.repair_hint) if run.env_file.is_file() else {}
    labels = _label_names(run.model_dir)
    sections = [
        _front_matter(config, metrics, repo_id),
        f"# {repo_id.split('/')[-1]}\n\n{_what_it_is(config, labels)}",
        _results(metrics),
        _training(config, metrics.get("train", {}), env),
        "## Learning curves\n\n![Learning curves: loss and metrics over optimizer steps](curves.png)"
        if run.curves_png.is_file()
        else "",
        _usage(config, repo_id),
        "## Config\n\nThe experiment file, as resolved by ftcli:\n\n```yaml\n"
        + run.config_file.read_text(encoding="utf-8").rstrip()
        + "\n```",
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _what_it_is(config: Config, labels: list[str]) -> str:
    base = f"`{_base_model(config) or config.model}`"
    return tasks.get(config.task).card_description(base, labels)


def _front_matter(config: Config, metrics: dict[str, Any], repo_id: str) -> str:
    """The card's metadata, through huggingface_hub's ModelCardData: its model-index (one result
    per split and metric) is the form the Hub validates and shows on the model's page."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline_task = tasks.get(config.task).pipeline_task
    dataset = config.data.hub or "local"
    dataset_name = f"{config.data.hub} {config.data.subset or ''}".strip() if config.data.hub else "local files"
    results = [
        EvalResult(
            task_type=pipeline_task, task_name=pipeline_task.replace("-", " ").title(), dataset_type=dataset,
            dataset_name=dataset_name, dataset_config=config.data.subset, dataset_split=split,
            metric_type=name, metric_value=float(value),
        )
        for split in SPLIT_ORDER
        if split != "train" and isinstance(metrics.get(split), dict)
        for name, value in metrics[split].items()
        if name in config.metrics
    ]
    card = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_task,
        tags=["ftcli", pipeline_task] + (["lora"] if config.lora else []),
        base_model=_base_model(config),
        datasets=[config.data.hub] if config.data.hub else None,
        metrics=config.metrics,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    return "---\n" + card.to_yaml() + "\n---"


def _base_model(config: Config) -> str | None:
    """The Hub id the run started from; None for a local folder."""
    if config.model in PACKAGED_MODELS:
        return PACKAGED_BASES.get(config.model)
    if Path(config.model).expanduser().exists() or config.model.startswith((".", "/", "~")):
        return None
    return config.model


def _label_names(model_dir: Path) -> list[str]:
    id2label = json.loads((model_dir / "config.json").read_text()).get("id2label", {})
    return [id2label[key] for key in sorted(id2label, key=int)]


def _results(metrics: dict[str, Any]) -> str:
    splits = [split for split in SPLIT_ORDER if split != "train" and isinstance(metrics.get(split), dict)]
    if not splits:
        return ""
    columns = list(dict.fromkeys(key for split in splits for key in metrics[split]))
    rows = [f"| split | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for split in splits:
        rows.append(f"| {split} | " + " | ".join(format_value(metrics[split].get(key, "")) for key in columns) + " |")
    baseline = metrics.get("data") or {}
    note = (
        f"\n\nAlways predicting the most common training class (`{baseline['majority_class']}`) would score "
        f"accuracy {format_value(baseline['majority_rate'])} on validation."
        if "majority_rate" in baseline
        else ""
    )
    return "## Results\n\n" + "\n".join(rows) + note


def _training(config: Config, train: dict[str, Any], env: dict[str, Any]) -> str:
    training = config.training
    lines = [
        f"- {train.get('global_step', '?')} optimizer steps ({float(train.get('epoch', 0)):.2f} epochs) "
        f"in {float(train.get('train_seconds', 0)):.1f} s on {env.get('device', 'an unknown device')}",
        f"- learning rate {training.learning_rate}, {training.scheduler} schedule, batch size {training.batch_size}"
        f" × {training.grad_accum} accumulated, max length {config.data.max_length} tokens",
    ]
    if config.lora:
        lora = config.lora
        lines.append(
            f"- LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, on "
            f"{', '.join(lora.target_modules) if lora.target_modules else 'the default layers'}; the classifier "
            "was trained in full. The adapters are merged into the weights here; `adapter/` holds them alone."
        )
    versions = ", ".join(f"{name} {env[name]}" for name in ("ftcli", "transformers", "torch") if name in env)
    if versions:
        lines.append(f"- {versions}")
    return "## Training\n\n" + "\n".join(lines)


def _usage(config: Config, repo_id: str) -> str:
    task = tasks.get(config.task)
    if len(config.data.text_fields) == 2:
        call = 'classifier({"text": "first sentence", "text_pair": "second sentence"})'
    else:
        call = 'classifier("a text to classify")'
    return (
        "## Usage\n\n```python\nfrom transformers import pipeline\n\n"
        f'classifier = pipeline("{task.pipeline_task}", model="{repo_id}"{task.pipeline_arguments})\n{call}\n```'
    )
