"""Encoders other than BERT train, evaluate and predict sentence pairs through the default (loop)
backend: models whose tokenizer gives no token_type_ids (DistilBERT, RoBERTa) and other embeddings
and attention (DeBERTa-v2, ELECTRA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke
from transformers import AutoModelForSequenceClassification, AutoTokenizer

SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}


def tiny_encoder(architecture: str, vocab_size: int, pad_token_id: int):
    from transformers import (
        DebertaV2Config,
        DebertaV2Model,
        DistilBertConfig,
        DistilBertModel,
        ElectraConfig,
        ElectraModel,
        RobertaConfig,
        RobertaModel,
    )

    if architecture == "distilbert":
        config = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return DistilBertModel(config), ["input_ids", "attention_mask"]
    if architecture == "roberta":  # positions start after the padding index; one token type
        config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=260, pad_token_id=pad_token_id, type_vocab_size=1, **SMALL)
        return RobertaModel(config), ["input_ids", "attention_mask"]
    if architecture == "deberta-v2":
        return DebertaV2Model(DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id, **SMALL)), None
    return ElectraModel(ElectraConfig(vocab_size=vocab_size, embedding_size=32, **SMALL)), None


@pytest.mark.parametrize("architecture", ["distilbert", "roberta", "deberta-v2", "electra"])
def test_other_encoders_train_evaluate_and_predict(architecture, make_experiment, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the MiniLM (bert-base-uncased) vocabulary
    torch.manual_seed(0)
    model, input_names = tiny_encoder(architecture, tokenizer.vocab_size, tokenizer.pad_token_id)
    if input_names:  # as these models' own tokenizers: no token_type_ids (saved with the tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_input_names=input_names)
    model_dir = tmp_path / architecture
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    experiment = make_experiment(pair=True, model=str(model_dir), training={"max_steps": 4, "eval_every": 2, "save_every": 2})
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "tiny"
    loaded = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert loaded.config.model_type == model.config.model_type and loaded.config.num_labels == 2
    assert invoke("evaluate", str(run)).exit_code == 0
    predicted = invoke("predict", str(run), "--text", "the film was great", "--text-pair", "a lovely story")
    assert predicted.exit_code == 0, predicted.output
    row = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert row["predicted_label"] in ("0", "1")
