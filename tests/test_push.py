"""ftcli push and output to the Hub: the model card, one commit of the right files, and clear failures that change nothing.

No test reaches the network: HfApi is replaced by a recorder.
"""

from __future__ import annotations

import hashlib

import huggingface_hub
import pytest
import yaml
from conftest import invoke
from huggingface_hub import constants

from ftcli import hub
from ftcli.config import load_config
from ftcli.commands.push import model_card
from ftcli.runs.rundir import RunDir

QUICK = {"max_steps": 4, "eval_every": 2, "save_every": 2}


class RecordingHfApi:
    """HfApi as push uses it; remembers the calls instead of uploading."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", {"repo_id": repo_id, **options}))

    def create_commit(self, repo_id, operations, **options):
        if self.fail_with is not None:
            raise self.fail_with
        files = {op.path_in_repo: op.path_or_fileobj for op in operations}
        self.calls.append(("create_commit", {"repo_id": repo_id, "files": files, **options}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc123"})()


@pytest.fixture
def hub_online(monkeypatch):
    """The Hub reachable and a token present, as far as ftcli can tell; uploads go to RecordingHfApi."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "fail_with", None)
    return RecordingHfApi


def snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_card_holds_config_metrics_curves_and_usage(make_experiment, tmp_path):
    assert invoke("train", str(make_experiment(pair=True, training=QUICK))).exit_code == 0
    run = RunDir(tmp_path / "runs" / "tiny")
    card = model_card(run, load_config(run.config_file), "someone/tiny-pairs")

    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers" and front_matter["pipeline_tag"] == "text-classification"
    assert "ftcli" in front_matter["tags"] and front_matter["metrics"] == ["accuracy", "f1"]
    assert "base_model" not in front_matter  # a local folder, not a Hub model
    # A model-index the Hub validates and shows: one result per split and configured metric.
    results = front_matter["model-index"][0]["results"]
    validation_scores = run.read_metrics()["validation"]
    shown = {(result["dataset"]["split"], metric["type"]): metric["value"] for result in results for metric in result["metrics"]}
    assert shown == {("validation", name): validation_scores[name] for name in ("accuracy", "f1")}
    assert "# tiny-pairs" in card and "2 classes: `0`, `1`" in card
    validation = run.read_metrics()["validation"]
    assert "| split | loss | accuracy | f1 |" in card
    assert f"| validation | {validation['loss']:.4f} | {validation['accuracy']:.4f} | {validation['f1']:.4f} |" in card
    assert "4 optimizer steps" in card and "learning rate 0.005" in card
    assert "![Learning curves" in card and "(curves.png)" in card
    assert '"text_pair"' in card and 'model="someone/tiny-pairs"' in card
    assert run.config_file.read_text().strip() in card  # the whole resolved config


def test_push_uploads_model_adapter_card_and_curves_in_one_commit(make_experiment, tmp_path, hub_online):
    experiment = make_experiment(training=QUICK, lora={"r": 4}, push_to_hub="someone/tiny")
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    assert "pushed to the Hub: https://huggingface.co/someone/tiny/commit/abc123" in trained.output

    (create, repo), (commit, upload) = hub_online.calls
    assert create == "create_repo" and repo == {"repo_id": "someone/tiny", "private": True, "exist_ok": True}
    assert commit == "create_commit" and upload["repo_id"] == "someone/tiny"
    files = upload["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "curves.png"} <= set(files)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(files)
    assert b"LoRA r=4" in files["README.md"] and b"- lora" in files["README.md"]

    pushed = invoke("push", str(tmp_path / "runs" / "tiny"), "someone/public-copy", "--public")
    assert pushed.exit_code == 0, pushed.output
    assert hub_online.calls[2][1] == {"repo_id": "someone/public-copy", "private": False, "exist_ok": True}


def test_push_offline_is_a_clear_error_and_changes_nothing(make_experiment, tmp_path, monkeypatch):
    assert invoke("train", str(make_experiment(training=QUICK))).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = snapshot(run)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = invoke("push", str(run), "someone/tiny")
    assert result.exit_code == 2
    assert "HF_HUB_OFFLINE is set" in result.output and "ftcli push" in result.output
    assert "Traceback" not in result.output
    assert snapshot(run) == before


def test_a_failed_upload_is_a_clear_error_and_changes_nothing(make_experiment, tmp_path, hub_online):
    assert invoke("train", str(make_experiment(training=QUICK))).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = snapshot(run)
    hub_online.fail_with = ConnectionError("Connection reset by peer")
    result = invoke("push", str(run), "someone/tiny")
    assert result.exit_code == 2
    assert "pushing" in result.output and "failed: Connection reset by peer" in result.output
    assert "unchanged" in result.output
    assert snapshot(run) == before


def test_push_to_hub_offline_fails_before_training(make_experiment, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = invoke("train", str(make_experiment(training=QUICK, push_to_hub="someone/tiny")))
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


def test_push_to_hub_must_be_a_repo_id(make_experiment):
    result = invoke("config", str(make_experiment(push_to_hub="a/b/c")))
    assert result.exit_code == 2 and "push_to_hub: 'a/b/c' is not a Hub repo id" in result.output
