"""Decoder models (Llama, Qwen2, Gemma) as their tokenizers ship (an end-of-text token, no pad token), and
ModernBERT: the pad token, the last-token pooling, LoRA's head and targets, QLoRA's settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from conftest import NEGATIVE, NOUNS, POSITIVE, invoke, sentiment_rows, write_rows
from safetensors.torch import load_file
from test_distill_tasks import _sigterm_at
from test_serve import serving

from ftcli.config import LoraConfig
from ftcli.errors import FtcliError

EOS = "<|endoftext|>"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TEXTS = [f"the {noun} was {good} and {bad}" for noun in NOUNS for good in POSITIVE for bad in NEGATIVE]


def _tokenizer(special_tokens: list[str], **kwargs):
    """A byte-level BPE trained here (no Hub), in transformers' fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **kwargs)


def _save_decoder(target: Path, config_class, model_class, **settings) -> Path:
    tokenizer = _tokenizer([EOS], eos_token=EOS)  # as Llama 3's and Qwen2's: no pad token
    assert tokenizer.pad_token is None
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **settings,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaModel

    return _save_decoder(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, LlamaModel)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2Model

    return _save_decoder(tmp_path_factory.mktemp("tiny-qwen2"), Qwen2Config, Qwen2Model)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    """Gemma's head_dim defaults to 256, whatever the hidden size: set to the tiny model's."""
    from transformers import GemmaConfig, GemmaModel

    return _save_decoder(tmp_path_factory.mktemp("tiny-gemma"), GemmaConfig, GemmaModel, head_dim=16)


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory) -> Path:
    """A tiny ModernBERT with a tokenizer shaped like its own: [CLS] text [SEP], no token_type_ids."""
    from tokenizers.processors import TemplateProcessing
    from transformers import ModernBertConfig, ModernBertModel

    target = tmp_path_factory.mktemp("tiny-modernbert")
    tokenizer = _tokenizer(
        ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"], cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        unk_token="[UNK]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 1)]
    )
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, pad_token_id=2, cls_token_id=0, sep_token_id=1, bos_token_id=0, eos_token_id=1,
        classifier_pooling="mean",  # as ModernBERT-base's; a tiny random model's [CLS] barely depends on the text
    )
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _experiment(folder: Path, model: Path, backend: str, lora: dict | None = None) -> Path:
    data = folder / "data"
    experiment = {
        "name": "run", "output_dir": str(folder / "runs"), "model": str(model), "backend": backend,
        "data": {
            "train": str(write_rows(data / "train.jsonl", sentiment_rows(64, seed=1))),
            "validation": str(write_rows(data / "validation.jsonl", sentiment_rows(16, seed=2))),
            "text_fields": ["text"], "max_length": 32,
        },
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "precision": "fp32", "eval_every": "epoch", "save_every": "epoch"},
        "metrics": ["accuracy"],
    }
    if lora:
        experiment["lora"] = lora
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def _train(folder: Path, model: Path, backend: str, lora: dict | None = None) -> Path:
    result = invoke("train", str(_experiment(folder, model, backend, lora)))
    assert result.exit_code == 0, result.output
    return folder / "runs" / "run"


# One run per architecture, backend and LoRA choice that together cover each: both backends, with and without LoRA.
RUNS = {
    "llama-loop": ("llama_dir", "loop", None),
    "llama-trainer-lora": ("llama_dir", "trainer", LORA),
    "qwen2-loop-lora": ("qwen2_dir", "loop", LORA),
    "qwen2-trainer": ("qwen2_dir", "trainer", None),
    "gemma-loop-lora": ("gemma_dir", "loop", LORA),
    "gemma-trainer": ("gemma_dir", "trainer", None),
}


class DecoderRun(NamedTuple):
    run: Path
    base: Path  # the model it started from
    lora: dict | None
    name: str  # its key in RUNS


@pytest.fixture(scope="module", params=list(RUNS))
def decoder_run(request, tmp_path_factory) -> DecoderRun:
    model_fixture, backend, lora = RUNS[request.param]
    model = request.getfixturevalue(model_fixture)
    return DecoderRun(_train(tmp_path_factory.mktemp(request.param), model, backend, lora), model, lora, request.param)


def _predict_rows(run: Path, texts: list[str], *options: str) -> list[dict]:
    """ftcli predict's rows for `texts`, in one --input file: predicted in batches."""
    source = write_rows(run.parent / "texts.jsonl", [{"text": text} for text in texts])
    result = invoke("predict", str(run), "--input", str(source), *options)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["text"] for row in rows] == texts
    return rows


@pytest.mark.slow  # its file's trainings: run first (conftest)
def test_a_decoder_trains_padding_with_its_end_of_text_token_and_saves_that_choice(decoder_run):
    run, base = decoder_run.run, decoder_run.base
    env = json.loads((run / "env.json").read_text())
    assert env["pad_token"].startswith(EOS)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert tokenizer.pad_token == EOS
    assert AutoConfig.from_pretrained(run / "model").pad_token_id == tokenizer.eos_token_id
    assert AutoConfig.from_pretrained(base).pad_token_id is None  # the base model's folder is untouched
    scored = invoke("evaluate", str(run))
    assert scored.exit_code == 0, scored.output
    # model/ reloaded scores what the model scored in memory before it was saved.
    reloaded = json.loads((run / "eval_validation.json").read_text())
    before_saving = json.loads((run / "metrics.json").read_text())["validation"]
    assert reloaded["loss"] == pytest.approx(before_saving["loss"], abs=1e-5)
    assert reloaded["accuracy"] == before_saving["accuracy"]


def test_env_and_metrics_say_the_attention_checkpointing_and_kernels_that_ran(decoder_run):
    """On the CPU: the transformers default attention, gradient checkpointing off (auto: on for a
    decoder on CUDA only), and eager steps without fused kernels, each with its reason."""
    run = decoder_run.run
    env = json.loads((run / "env.json").read_text())
    assert env["attention"] == "sdpa"
    assert env["gradient_checkpointing"] is False
    assert env["gradient_checkpointing_reason"] == "auto: off, a decoder on cpu (on for a decoder on cuda)"
    kernels = json.loads((run / "metrics.json").read_text())["train"]["kernels"]
    assert kernels["step"] == "eager" and kernels["fused"] == []
    if decoder_run.name.endswith(("loop", "loop-lora")):
        assert kernels["why"] == "cpu" and "only inside a CUDA graph step" in kernels["not_fused"]
    else:
        assert kernels["why"] == "the trainer backend (HF Trainer's steps)"


def test_gradient_checkpointing_auto_is_on_for_a_decoder_on_cuda_and_forced_either_way(llama_dir, modernbert_dir):
    from transformers import AutoConfig

    from ftcli.modeling import resolve_gradient_checkpointing

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llama, modernbert = AutoConfig.from_pretrained(llama_dir), AutoConfig.from_pretrained(modernbert_dir)
    assert resolve_gradient_checkpointing("auto", llama, cuda) == (True, "auto: on, a decoder on cuda")
    assert resolve_gradient_checkpointing("auto", llama, cpu)[0] is False
    assert resolve_gradient_checkpointing("auto", modernbert, cuda) == (False, "auto: off, not a decoder (modernbert)")
    assert resolve_gradient_checkpointing(True, modernbert, cpu) == (True, "training.gradient_checkpointing: true")
    assert resolve_gradient_checkpointing(False, llama, cuda) == (False, "training.gradient_checkpointing: false")


def test_modernbert_asks_for_flash_attention_2_on_cuda_where_flash_attn_is_installed(llama_dir, modernbert_dir, monkeypatch):
    from ftcli import modeling

    cuda = torch.device("cuda")
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: True)
    assert modeling.preferred_attention(str(modernbert_dir), cuda, torch.bfloat16) == "flash_attention_2"
    assert modeling.preferred_attention(str(llama_dir), cuda, torch.bfloat16) is None  # decoders: transformers' default
    assert modeling.preferred_attention(str(modernbert_dir), torch.device("cpu"), torch.bfloat16) is None
    assert modeling.preferred_attention(str(modernbert_dir), cuda, None) is None  # fp32: flash-attn takes half precision only
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: False)
    assert modeling.preferred_attention(str(modernbert_dir), cuda, torch.bfloat16) is None


def test_the_end_of_text_choice_is_said_once_in_the_log(llama_dir, tmp_path, caplog):
    _train(tmp_path, llama_dir, "loop")
    chosen = [record.getMessage() for record in caplog.records if record.getMessage().startswith("pad token:")]
    assert chosen == [f"pad token: {EOS} (the end-of-text token: the tokenizer had none)"]


def test_a_prediction_does_not_depend_on_the_batch_with_either_padding_side(decoder_run):
    """The head reads each text's last token that is not padding, whichever side pads: alone or
    beside a much longer text, a text gets the same logits, in transformers and in ftcli predict."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = decoder_run.run
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    short, long = "the film was great", " ".join(TEXTS[:6])
    for side in ("right", "left"):
        tokenizer = AutoTokenizer.from_pretrained(run / "model", padding_side=side)
        with torch.no_grad():
            alone = model(**tokenizer([short], return_tensors="pt")).logits[0]
            batch = tokenizer([short, long], return_tensors="pt", padding=True)
            assert (batch["attention_mask"] == 0).any()  # the short text is padded
            beside = model(**batch).logits[0]
        assert torch.allclose(alone, beside, atol=1e-5), side
    alone, beside = (_predict_rows(run, texts, "--engine", "torch")[0] for texts in ([short], [short, long]))
    assert alone["probabilities"] == pytest.approx(beside["probabilities"], abs=1e-6)


def test_pipeline_batches_the_saved_decoder(decoder_run):
    from transformers import pipeline

    run = decoder_run.run
    classify = pipeline("text-classification", model=str(run / "model"), device="cpu")
    texts = ["the film was great", " ".join(TEXTS[:6]), "a plot"]
    one_by_one = [classify(text)[0] for text in texts]
    batched = classify(texts, batch_size=3)
    assert [row["label"] for row in batched] == [row["label"] for row in one_by_one]
    assert [row["score"] for row in batched] == pytest.approx([row["score"] for row in one_by_one], abs=1e-5)


def test_lora_trains_and_saves_the_decoders_new_head_and_adapts_attention_and_mlp(decoder_run):
    run = decoder_run.run
    if decoder_run.lora is None:
        pytest.skip("a run without LoRA")
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"]
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "base_model.model.score.weight" in load_file(run / "adapter" / "adapter_model.safetensors")  # the whole head
    texts = ["the film was great", " ".join(TEXTS[:4]), "the plot was awful"]
    merged = _predict_rows(run, texts, "--engine", "torch")
    adapted = _predict_rows(run, texts, "--adapter")
    assert [row["predicted_label"] for row in adapted] == [row["predicted_label"] for row in merged]
    assert [row["probability"] for row in adapted] == pytest.approx([row["probability"] for row in merged], abs=1e-5)


def test_a_decoder_served_answers_as_ftcli_predict(decoder_run):
    """The server pads its own batches (with the end-of-text token): each text's probabilities are
    ftcli predict's, asked alone or beside longer texts."""
    run = decoder_run.run
    texts = ["the film was great", " ".join(TEXTS[:6]), "a plot"]
    expected = _predict_rows(run, texts, "--engine", "torch")
    with serving(run, engine="torch") as client:
        together = client.post("/v1/predict", json={"inputs": texts})
        alone = [client.post("/v1/predict", json={"inputs": text}).json()["predictions"][0] for text in texts]
    assert together.status_code == 200, together.text
    for answers in (together.json()["predictions"], alone):
        assert [answer["predicted_label"] for answer in answers] == [row["predicted_label"] for row in expected]
        for answer, row in zip(answers, expected):
            assert answer["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)


def _assert_export_predicts_as_torch(run: Path) -> None:
    exported = invoke("export", str(run))
    assert exported.exit_code == 0, exported.output
    texts = ["the film was great", " ".join(TEXTS[:4])]
    on_onnx = _predict_rows(run, texts, "--engine", "onnx")
    on_torch = _predict_rows(run, texts, "--engine", "torch")
    assert [row["probability"] for row in on_onnx] == pytest.approx([row["probability"] for row in on_torch], abs=1e-4)


def test_export_of_a_decoder_run_predicts_as_torch(decoder_run):
    if decoder_run.name not in ("llama-loop", "gemma-loop-lora"):
        pytest.skip("an export takes seconds; two decoders' (one merged from LoRA) are enough")
    # the head's search for each text's last token traces into the graph
    _assert_export_predicts_as_torch(decoder_run.run)


def test_a_tokenizer_with_neither_pad_nor_end_of_text_token_is_one_line(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare)
    tokenizer = AutoTokenizer.from_pretrained(bare)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(bare)
    result = invoke("train", str(_experiment(tmp_path, bare, "loop")))
    assert result.exit_code == 2 and "no pad token and no end-of-text token" in result.output, result.output
    assert not (tmp_path / "runs" / "run").exists()


def test_modernbert_trains_and_predicts_without_token_type_ids(modernbert_dir, tmp_path):
    from transformers import AutoTokenizer

    assert "token_type_ids" not in AutoTokenizer.from_pretrained(modernbert_dir)("a text")
    run = _train(tmp_path, modernbert_dir, "loop", LORA)
    assert json.loads((run / "env.json").read_text())["attention"] == "sdpa (padded)"  # flash_attention_2 alone unpads
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"] and adapter["target_modules"]
    rows = _predict_rows(run, ["the film was great", "the plot was awful"])
    assert len(rows) == 2 and all(row["predicted_label"] in ("negative", "positive") for row in rows)


@pytest.fixture(scope="module")
def modernbert_trainer_lora(modernbert_dir, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("modernbert-trainer-lora"), modernbert_dir, "trainer", LORA)


def test_modernbert_trains_through_the_trainer_with_lora_and_reloads_as_it_was(modernbert_trainer_lora):
    run = modernbert_trainer_lora
    assert "classifier" in json.loads((run / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    scored = invoke("evaluate", str(run))
    assert scored.exit_code == 0, scored.output
    reloaded = json.loads((run / "eval_validation.json").read_text())
    assert reloaded["loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["validation"]["loss"], abs=1e-5)
    short, long = "the film was great", " ".join(TEXTS[:6])
    merged = _predict_rows(run, [short, long], "--engine", "torch")
    adapted = _predict_rows(run, [short, long], "--adapter")
    alone = _predict_rows(run, [short], "--engine", "torch")
    assert [row["probability"] for row in adapted] == pytest.approx([row["probability"] for row in merged], abs=1e-5)
    assert alone[0]["probabilities"] == pytest.approx(merged[0]["probabilities"], abs=1e-5)


def test_export_of_modernbert_predicts_as_torch(modernbert_trainer_lora):
    _assert_export_predicts_as_torch(modernbert_trainer_lora)


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_a_decoder_run_stopped_after_a_checkpoint_resumes_exactly(llama_dir, tmp_path, monkeypatch, lora):
    schedule = [f"training.{key}={value}" for key, value in (("epochs", 1), ("save_every", 2), ("eval_every", 2), ("logging_steps", 2))]

    def train(name: str):
        experiment = _experiment(tmp_path / name, llama_dir, "loop", lora)
        return invoke("train", str(experiment), *[option for setting in schedule for option in ("--set", setting)])

    assert (done := train("straight")).exit_code == 0, done.output
    with monkeypatch.context() as patched:
        _sigterm_at(patched, 3)  # after checkpoint-2, mid-epoch (8 steps an epoch)
        interrupted = train("stopped")
    straight, stopped = tmp_path / "straight" / "runs" / "run", tmp_path / "stopped" / "runs" / "run"
    assert interrupted.exit_code == 128 + 15, interrupted.output
    assert not (stopped / "model").exists() and (stopped / "checkpoints" / "checkpoint-3").is_dir()
    resumed = invoke("train", str(stopped), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((stopped / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-3")
    assert (stopped / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    expected, weights = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert expected.keys() == weights.keys() and all(torch.equal(expected[name], weights[name]) for name in expected)


# ---------------------------------------------------------------- QLoRA (lora.quantize)


def test_lora_quantize_is_refused_on_the_cpu_before_bitsandbytes_is_imported(llama_dir, tmp_path):
    import sys

    experiment = _experiment(tmp_path, llama_dir, "loop", LORA | {"quantize": "4bit"})
    result = invoke("train", str(experiment))
    assert result.exit_code == 2, result.output
    assert "lora.quantize: 4bit needs an NVIDIA GPU" in result.output
    assert "bitsandbytes" not in sys.modules
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_quantization_keeps_the_head_found_per_architecture_out(llama_dir, bits):
    from ftcli.lora import head_names, quantization_config

    head = head_names(str(llama_dir))
    assert head == ["score"]
    settings = quantization_config(LoraConfig(quantize=bits), head, torch.bfloat16)
    assert settings.llm_int8_skip_modules == ["score"]
    assert settings.load_in_4bit == (bits == "4bit") and settings.load_in_8bit == (bits == "8bit")
    if bits == "4bit":
        assert settings.bnb_4bit_quant_type == "nf4" and settings.bnb_4bit_compute_dtype == torch.bfloat16


def test_quantize_accepts_only_4bit_or_8bit():
    with pytest.raises(ValueError):
        LoraConfig(quantize="2bit")
    with pytest.raises(FtcliError, match="needs an NVIDIA GPU"):
        from ftcli.lora import check_quantize

        check_quantize(LoraConfig(quantize="8bit"), torch.device("cpu"))
