"""A student cut from its teacher's trained model (`ftcli distill --student layers:K`): for each
family, the student computes what the teacher computes with its other layers skipped, reloads as
it was in memory, and trains through `ftcli train` as any model folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke
from test_architectures import tiny_encoder
from test_decoders import llama_dir, modernbert_dir, qwen2_dir  # noqa: F401 (fixtures)
from transformers import AutoConfig, AutoTokenizer

from ftcli.errors import FtcliError
from ftcli.modeling import HEADS, load_model
from ftcli.students import STAMP_FILE, build_student, cut_layers, kept_layers, parse_student

TEXTS = ["the film was great and the plot was lovely and the cast superb", "a dreadful ending"]
DECODER_FIXTURES = {"llama": "llama_dir", "qwen2": "qwen2_dir", "modernbert": "modernbert_dir"}
# Per-layer kinds that a student must keep by teacher layer, not rebuild by its new position:
# windows of a few tokens, so that a wrong kind changes the logits of TEXTS.
KINDS = ["full_attention", "sliding_attention"] * 3
OVERRIDES = {
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 2, "layer_types": KINDS},
}
FAMILIES = ["bert", "distilbert", "roberta", "deberta-v2", "electra", "modernbert", "llama", "qwen2"]


def deepen(config, tokenizer, layers: int, head: str, labels: list[str], target: Path, **overrides) -> Path:
    """A teacher of `layers` random layers, of the tiny builders' config and tokenizer, with a head of `labels`."""
    values = {key: value for key, value in config.to_dict().items() if key != "layer_types"}  # rebuilt for `layers`
    values[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = layers
    names = {"id2label": dict(enumerate(labels)), "label2id": {name: index for index, name in enumerate(labels)}}
    deep = type(config).from_dict(values | names | overrides)
    torch.manual_seed(0)
    HEADS[head].from_config(deep).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def teacher(request, tmp_path_factory, tiny_model_dir):
    """teacher(family, head): a 6-layer teacher of that family, built once per module."""
    built: dict[tuple, Path] = {}

    def make(family: str, head: str = "sequence_classification", layers: int = 6, labels: tuple = ("a", "b", "c")) -> Path:
        if (family, head, layers, labels) not in built:
            target = tmp_path_factory.mktemp(f"teacher-{family}")
            base = request.getfixturevalue(DECODER_FIXTURES[family]) if family in DECODER_FIXTURES else tiny_model_dir
            tokenizer = AutoTokenizer.from_pretrained(base)
            if family in DECODER_FIXTURES or family == "bert":
                config = AutoConfig.from_pretrained(base)
            else:
                model, input_names = tiny_encoder(family, tokenizer.vocab_size, tokenizer.pad_token_id)
                config = model.config
                if input_names:
                    tokenizer = AutoTokenizer.from_pretrained(base, model_input_names=input_names)
            built[family, head, layers, labels] = deepen(
                config, tokenizer, layers, head, list(labels), target, **OVERRIDES.get(family, {})
            )
        return built[family, head, layers, labels]

    return make


def skipping(model: torch.nn.Module, stack: torch.nn.ModuleList, kept: list[int]) -> list:
    """Make every layer of `stack` not in `kept` hand its input on unchanged: the teacher then
    computes what its student should."""

    def hand_on(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [layer.register_forward_hook(hand_on, with_kwargs=True) for index, layer in enumerate(stack) if index not in kept]


def stack_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The teacher's layers, found by its family's own attribute names."""
    for path in ("bert.encoder.layer", "distilbert.transformer.layer", "roberta.encoder.layer", "deberta.encoder.layer",
                 "electra.encoder.layer", "model.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(type(model).__name__)


def logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


CASES = [(family, "sequence_classification") for family in FAMILIES] + [
    (family, "token_classification") for family in ("bert", "modernbert", "llama")
]


@pytest.mark.parametrize(("family", "head"), CASES)
def test_a_student_computes_its_teacher_with_the_other_layers_skipped(family, head, teacher, tmp_path):
    source = teacher(family, head)
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = load_model(str(source), head=head).eval()
    student = copy.deepcopy(original)
    cut_layers(student, [0, 2, 5])
    assert student.config.num_hidden_layers == 3 and len(stack_of(student)) == 3

    hooks = skipping(original, stack_of(original), [0, 2, 5])
    expected = [logits(original, tokenizer, text) for text in TEXTS]
    for hook in hooks:
        hook.remove()
    assert not torch.allclose(expected[0], logits(original, tokenizer, TEXTS[0]), atol=1e-4)  # the skipped layers count
    in_memory = [logits(student, tokenizer, text) for text in TEXTS]
    for got, want in zip(in_memory, expected):
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    record = build_student(source, 3, tmp_path / "student", head)
    assert record["layers"] == [0, 2, 5] and record["of"] == 6 and record["from"] == str(source)
    assert record["parameters"] == sum(parameter.numel() for parameter in student.parameters())
    reloaded, info = HEADS[head].from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for got, want in zip((logits(reloaded.eval(), tokenizer, text) for text in TEXTS), in_memory):
        assert torch.allclose(got, want, atol=1e-6)
    # The weights outside the layers (embeddings, final norm, head) are the teacher's.
    teacher_weights = original.state_dict()
    for key, tensor in reloaded.state_dict().items():
        if not any(part.isdigit() for part in key.split(".")):
            assert torch.equal(tensor, teacher_weights[key]), key


@pytest.mark.parametrize("family", ["modernbert", "qwen2"])
def test_each_kept_layer_keeps_its_own_kind_of_attention(family, teacher, tmp_path):
    build_student(teacher(family), 3, tmp_path / "student", "sequence_classification")
    assert AutoConfig.from_pretrained(tmp_path / "student").layer_types == [KINDS[0], KINDS[2], KINDS[5]]


def test_kept_layers_are_evenly_spaced_from_the_first_to_the_last():
    assert kept_layers(6, 3) == [0, 2, 5]  # 2.5 rounds to the even index
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert kept_layers(12, 4) == [0, 4, 7, 11]
    assert kept_layers(2, 1) == [0] and kept_layers(12, 1) == [0]
    for total in range(2, 49):
        for keep in range(2, total):
            chosen = kept_layers(total, keep)
            assert len(chosen) == keep and chosen[0] == 0 and chosen[-1] == total - 1
            assert all(later > earlier for earlier, later in zip(chosen, chosen[1:]))


@pytest.mark.parametrize("keep", [6, 7])
def test_a_student_must_have_fewer_layers_than_its_teacher(keep):
    with pytest.raises(FtcliError) as raised:
        kept_layers(6, keep)
    assert raised.value.message == "the teacher has only 6 layers; choose layers:K with K < 6"


def test_parse_student():
    assert parse_student("layers:3") == 3 and parse_student("layers:12") == 12
    assert parse_student("minilm") is None and parse_student("/models/small-bert") is None
    for wrong in ("layers:0", "layers:x", "layers:", "layers:-1", "layers:2.5"):
        with pytest.raises(FtcliError) as raised:
            parse_student(wrong)
        assert "\n" not in str(raised.value) and "--student layers:3" in raised.value.hint


def test_building_again_from_the_same_teacher_keeps_the_student(teacher, tmp_path):
    source, target = teacher("bert"), tmp_path / "student"
    first = build_student(source, 2, target, "sequence_classification")
    written = (target / "model.safetensors").stat().st_mtime_ns
    assert build_student(source, 2, target, "sequence_classification") == first
    assert (target / "model.safetensors").stat().st_mtime_ns == written
    # Another K, or a teacher retrained since, builds it again.
    assert build_student(source, 3, target, "sequence_classification")["layers"] == [0, 2, 5]
    assert AutoConfig.from_pretrained(target).num_hidden_layers == 3
    retrained = tmp_path / "retrained"
    shutil.copytree(source, retrained)
    build_student(retrained, 3, target, "sequence_classification")
    written = (target / "model.safetensors").stat().st_mtime_ns
    os.utime(retrained / "model.safetensors", ns=(written + 10**9, written + 10**9))
    build_student(retrained, 3, target, "sequence_classification")
    assert (target / "model.safetensors").stat().st_mtime_ns != written
    stamp = json.loads((target / STAMP_FILE).read_text())
    assert stamp["keep"] == 3 and stamp["record"]["layers"] == [0, 2, 5]


def test_a_damaged_stamp_or_a_stamp_without_weights_builds_the_student_again(teacher, tmp_path):
    target = tmp_path / "student"
    build_student(teacher("bert"), 2, target, "sequence_classification")
    (target / STAMP_FILE).write_text('{"keep": 2, "teac')
    assert build_student(teacher("bert"), 2, target, "sequence_classification")["layers"] == [0, 5]
    assert json.loads((target / STAMP_FILE).read_text())["keep"] == 2
    (target / "model.safetensors").unlink()  # a stamp without its weights
    assert build_student(teacher("bert"), 2, target, "sequence_classification")["layers"] == [0, 5]
    assert (target / "model.safetensors").is_file()


def test_a_teacher_of_too_few_layers_or_none_is_one_line(teacher, tmp_path):
    with pytest.raises(FtcliError, match="the teacher has only 6 layers"):
        build_student(teacher("bert"), 6, tmp_path / "student", "sequence_classification")
    assert not (tmp_path / "student").exists()
    with pytest.raises(FtcliError, match="holds no model"):
        build_student(tmp_path, 2, tmp_path / "student", "sequence_classification")


def test_a_model_without_one_stack_of_its_layers_is_refused(teacher):
    model = load_model(str(teacher("bert")))
    model.config.num_hidden_layers = 5
    with pytest.raises(FtcliError, match="stack of 5 layers.*none"):
        cut_layers(model, [0, 4])
    model.config.num_hidden_layers = 6
    model.extra = torch.nn.ModuleList(torch.nn.Identity() for _ in range(6))
    with pytest.raises(FtcliError, match=r"stack of 6 layers.*2 \(bert.encoder.layer, extra\)"):
        cut_layers(model, [0, 5])


def test_a_student_its_config_would_not_rebuild_is_refused(teacher):
    """ModernBERT's first layer has no attention norm: a student whose first layer is another
    would reload without that norm."""
    model = load_model(str(teacher("modernbert")))
    with pytest.raises(FtcliError, match="cannot be cut by layers.*attn_norm"):
        cut_layers(model, [1, 3])


def test_a_student_of_a_four_layer_bert_trains_as_an_ordinary_model(teacher, make_experiment, tmp_path):
    student = tmp_path / "student"
    # As a teacher run of the experiment's task and labels would be.
    build_student(teacher("bert", layers=4, labels=("negative", "positive")), 2, student, "sequence_classification")
    experiment = make_experiment(model=str(student), training={"max_steps": 4, "eval_every": 2, "save_every": 2})
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    config = AutoConfig.from_pretrained(tmp_path / "runs" / "tiny" / "model")
    assert config.num_hidden_layers == 2 and config.num_labels == 2
