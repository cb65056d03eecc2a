"""Hugging Face model directories as teachers (#11 item 1): loading, names, and the safety checks.

Every logits check compares against transformers' own ``model(**batch).logits``, the directory
loaded by the test itself (``_hf_fixtures.reference_model``).
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _hf_fixtures import LABELS, TEXT_LABELS, TEXTS, hf_dirs, make_images, reference_model, text_batch

from calibrate_teacher import collect_logits
from calibrate_teacher.errors import InputError, InvalidValueError, MissingDependencyError, TeacherError
from calibrate_teacher.teachers import find_model_classes, find_model_preprocessing, load_teacher
from calibrate_teacher.teachers._files import detect_format
from calibrate_teacher.teachers._hf import is_hf_directory, open_pretrained

__all__ = ["hf_dirs"]  # the session fixture, imported so pytest finds it

INPUT_NAMES = {
    "bert": ("input_ids", "attention_mask", "token_type_ids"),
    "distilbert": ("input_ids", "attention_mask"),
    "roberta": ("input_ids", "attention_mask"),
    "vit": ("pixel_values",),
}


def _batch(kind: str, directory: Path, rows: int = 16, seed: int = 3) -> dict[str, torch.Tensor]:
    if kind == "vit":
        return {"pixel_values": make_images(rows, seed=seed)[0]}
    return text_batch(directory, TEXTS[:rows])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "vit"])
def test_logits_equal_transformers_forward(hf_dirs, kind):
    directory = hf_dirs[kind]
    teacher = load_teacher(directory)
    assert teacher.format == "hf"
    assert teacher.num_classes == 3
    assert teacher.input_names == INPUT_NAMES[kind]
    assert teacher.device == "cpu"
    batch = _batch(kind, directory)
    with torch.no_grad():
        expected = reference_model(directory, image=kind == "vit")(**batch).logits
    got = teacher.logits(batch)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    # The model is a real, overconfident teacher: mostly right, with confident outputs.
    if kind != "vit":
        accuracy = (got.argmax(1) == torch.tensor(TEXT_LABELS[:16])).float().mean()
        assert accuracy >= 0.7
    assert any("AutoModelFor" in note and "dtype float32" in note for note in teacher.notes)


def test_single_tensor_feeds_the_one_input(hf_dirs):
    teacher = load_teacher(hf_dirs["vit"])
    x = make_images(4, seed=5)[0]
    with torch.no_grad():
        expected = reference_model(hf_dirs["vit"], image=True)(pixel_values=x).logits
    assert torch.allclose(teacher.logits(x), expected, rtol=0, atol=1e-6)
    assert teacher.input_spec is not None and teacher.input_spec.shape == (None, 3, 16, 16)


def test_collect_logits_over_mapping_batches(hf_dirs):
    directory = hf_dirs["bert"]
    teacher = load_teacher(directory)
    batches = []
    for start in range(0, 32, 8):
        enc = text_batch(directory, TEXTS[start : start + 8])
        batches.append((enc, torch.tensor(TEXT_LABELS[start : start + 8])))
    logits = collect_logits(teacher, batches)
    model = reference_model(directory)
    with torch.no_grad():
        expected = torch.cat([model(**enc).logits for enc, _ in batches])
    assert torch.allclose(logits.logits, expected, rtol=0, atol=1e-6)
    assert logits.labels.tolist() == TEXT_LABELS[:32]


def test_missing_attention_mask_is_an_error_not_a_silent_run(hf_dirs):
    teacher = load_teacher(hf_dirs["distilbert"])
    batch = text_batch(hf_dirs["distilbert"], TEXTS[:4])
    with pytest.raises(TeacherError, match="attention_mask"):
        teacher.logits({"input_ids": batch["input_ids"]})
    with pytest.raises(TeacherError, match="one tensor"):
        teacher.logits(batch["input_ids"])


def test_class_names_from_id2label(hf_dirs):
    found = find_model_classes(hf_dirs["roberta"])
    assert found is not None
    names, origin = found
    assert names == LABELS
    assert "id2label" in origin


def test_placeholder_label_names_are_not_names(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["bert"], tmp_path / "bert")
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
    (directory / "config.json").write_text(json.dumps(config))
    assert find_model_classes(directory) is None
    (directory / "classes.txt").write_text("a\nb\nc\n")  # a user's own list wins
    assert find_model_classes(directory)[0] == ("a", "b", "c")


def test_preprocessor_config_is_read_from_inside_the_directory(hf_dirs):
    layers = find_model_preprocessing(hf_dirs["vit"])
    assert len(layers) == 1
    values = layers[0].values
    assert values["input_size"] == [3, 16, 16]
    assert values["crop_mode"] == "squash"
    assert values["mean"] == pytest.approx([0.5] * 3)
    assert find_model_preprocessing(hf_dirs["bert"]) == ()


def test_detection(hf_dirs, tmp_path):
    assert is_hf_directory(hf_dirs["bert"])
    assert detect_format(hf_dirs["bert"]) == "hf"
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InputError, match="not a Hugging Face model directory"):
        detect_format(plain)
    (plain / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))  # timm
    assert not is_hf_directory(plain)
    with pytest.raises(InputError, match="no model_type"):
        load_teacher(plain)


def test_arch_and_output_options_are_refused(hf_dirs):
    with pytest.raises(InvalidValueError, match="drop --arch"):
        load_teacher(hf_dirs["bert"], arch="x:y")
    with pytest.raises(InvalidValueError, match="drop --output"):
        load_teacher(hf_dirs["bert"], output="hidden_states")


def test_bfloat16_directory_loads_in_its_dtype(hf_dirs, tmp_path):
    model = reference_model(hf_dirs["bert"]).to(torch.bfloat16)
    directory = tmp_path / "bf16"
    model.save_pretrained(directory)
    shutil.copy(hf_dirs["bert"] / "tokenizer.json", directory)
    shutil.copy(hf_dirs["bert"] / "tokenizer_config.json", directory)
    teacher = load_teacher(directory)
    assert teacher.precision == "bfloat16"
    batch = text_batch(directory, TEXTS[:8])
    got = teacher.logits(batch)
    assert got.dtype == torch.float32
    with torch.no_grad():
        expected = model(**batch).logits.float()
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert any("dtype bfloat16 (config.json dtype)" in n for n in teacher.notes)


def test_missing_head_weights_are_refused(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _copy(hf_dirs["bert"], tmp_path / "headless")
    weights = load_file(directory / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("classifier")},
        directory / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(TeacherError, match="initialise at random"):
        load_teacher(directory)


# --- the safety checks ------------------------------------------------------------------------


def test_index_naming_a_file_outside_is_refused(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["bert"], tmp_path / "m")
    shutil.move(directory / "model.safetensors", tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"classifier.weight": "../outside.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the model directory"):
        load_teacher(directory)


def test_symlink_pointing_outside_is_refused(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["bert"], tmp_path / "m")
    shutil.move(directory / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (directory / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match="outside the model directory"):
        load_teacher(directory)


def test_hub_cache_snapshot_links_into_its_blobs(hf_dirs, tmp_path):
    repo = tmp_path / "models--me--bert"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(hf_dirs["bert"].iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    teacher = load_teacher(snapshot)
    batch = text_batch(hf_dirs["bert"], TEXTS[:4])
    with torch.no_grad():
        expected = reference_model(hf_dirs["bert"])(**batch).logits
    assert torch.allclose(teacher.logits(batch), expected, rtol=0, atol=1e-6)
    assert any("Hub cache snapshot" in n for n in teacher.notes)


def test_sharded_safetensors_load(hf_dirs, tmp_path):
    model = reference_model(hf_dirs["bert"])
    directory = tmp_path / "sharded"
    model.save_pretrained(directory, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    teacher = load_teacher(directory)
    batch = text_batch(hf_dirs["bert"], TEXTS[:8])
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.allclose(teacher.logits(batch), expected, rtol=0, atol=1e-6)


def _bin_only(hf_dirs: dict[str, Path], directory: Path, payload: object | None = None) -> Path:
    from safetensors.torch import load_file

    _copy(hf_dirs["bert"], directory)
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    if payload is not None:
        weights["payload"] = payload
    torch.save(weights, directory / "pytorch_model.bin")
    return directory


def test_bin_only_directory_loads_with_weights_only(hf_dirs, tmp_path):
    directory = _bin_only(hf_dirs, tmp_path / "bin")
    teacher = load_teacher(directory)
    batch = text_batch(directory, TEXTS[:8])
    with torch.no_grad():
        expected = reference_model(hf_dirs["bert"])(**batch).logits
    assert torch.allclose(teacher.logits(batch), expected, rtol=0, atol=1e-6)
    assert any("weights_only=True" in n for n in teacher.notes)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a pickle that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_in_bin_runs_nothing(hf_dirs, tmp_path):
    marker = tmp_path / "payload-ran"
    directory = _bin_only(hf_dirs, tmp_path / "evil", payload=_Payload(marker))
    with pytest.raises(TeacherError, match="weights_only=True refused"):
        load_teacher(directory)
    assert not marker.exists()


def test_peft_adapter_is_refused(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["bert"], tmp_path / "m")
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/etc"}))
    with pytest.raises(InputError, match="PEFT adapter"):
        load_teacher(directory)


def test_missing_transformers_gives_the_install_hint(hf_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'calibrate-teacher\[hf\]'"):
        load_teacher(hf_dirs["bert"])


# --- remote code ------------------------------------------------------------------------------

_CONFIGURATION = """
from transformers import PretrainedConfig


class TinyXConfig(PretrainedConfig):
    model_type = "tiny-x"

    def __init__(self, width=4, vocab=50, **kwargs):
        self.width = width
        self.vocab = vocab
        super().__init__(**kwargs)
"""

_MODELING = """
import pathlib

pathlib.Path({marker!r}).write_text("imported")

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_x import TinyXConfig


class TinyXForSequenceClassification(PreTrainedModel):
    config_class = TinyXConfig
    base_model_prefix = "tinyx"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab, config.width)
        self.classifier = torch.nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return SequenceClassifierOutput(logits=self.classifier((h * m).sum(1) / m.sum(1)))
"""


def _remote_code_dir(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    directory, marker = tmp_path / "remote", tmp_path / "remote-code-ran"
    directory.mkdir()
    (directory / "configuration_x.py").write_text(textwrap.dedent(_CONFIGURATION))
    (directory / "modeling_x.py").write_text(textwrap.dedent(_MODELING.format(marker=str(marker))))
    gen = torch.Generator().manual_seed(0)
    weights = {
        "embed.weight": torch.randn(50, 4, generator=gen),
        "classifier.weight": torch.randn(3, 4, generator=gen),
        "classifier.bias": torch.randn(3, generator=gen),
    }
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "tiny-x",
        "architectures": ["TinyXForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "configuration_x.TinyXConfig",
            "AutoModelForSequenceClassification": "modeling_x.TinyXForSequenceClassification",
        },
        "width": 4,
        "vocab": 50,
        "id2label": {"0": "x", "1": "y", "2": "z"},
        "label2id": {"x": 0, "y": 1, "z": 2},
        "dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker, weights


def test_remote_code_is_refused_before_anything_is_imported(tmp_path):
    directory, marker, _ = _remote_code_dir(tmp_path)
    with pytest.raises(TeacherError, match="--trust-remote-code"):
        load_teacher(directory)
    with pytest.raises(TeacherError, match="auto_map"):
        open_pretrained(directory)
    assert not marker.exists()


def test_remote_code_loads_when_trusted(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    directory, marker, weights = _remote_code_dir(tmp_path)
    teacher = load_teacher(directory, trust_remote_code=True)
    assert marker.exists()
    assert teacher.input_names == ("input_ids", "attention_mask")
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # The reference, by hand in float64: masked mean of the embeddings, then the Linear.
    h = weights["embed.weight"].double()[ids]
    m = mask.unsqueeze(-1).double()
    expected = ((h * m).sum(1) / m.sum(1)) @ weights["classifier.weight"].double().T + weights[
        "classifier.bias"
    ].double()
    got = teacher.logits({"input_ids": ids, "attention_mask": mask})
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-6)
    assert find_model_classes(directory)[0] == ("x", "y", "z")
    assert any("ran the directory's own code" in n for n in teacher.notes)


def test_remote_code_from_another_repo_is_refused_even_when_trusted(tmp_path):
    directory, marker, _ = _remote_code_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"]["AutoModelForSequenceClassification"] = "someone/repo--modeling_x.TinyXForSequenceClassification"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="another Hub repo"):
        load_teacher(directory, trust_remote_code=True)
    assert not marker.exists()


# --- token-level heads ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    directory = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_causal_lm_is_refused_as_a_classifier_but_opens(tiny_gpt2):
    with pytest.raises(TeacherError, match="language-model path"):
        load_teacher(tiny_gpt2)
    model, notes = open_pretrained(tiny_gpt2)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not model.training
    assert any("AutoModelForCausalLM" in n for n in notes)
    explicit, _ = open_pretrained(tiny_gpt2, auto_class="AutoModelForCausalLM", device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, explicit(input_ids=ids).logits)


def test_token_classifier_is_refused_as_a_classifier(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=4,
    )
    BertForTokenClassification(config).save_pretrained(tmp_path / "tok")
    with pytest.raises(TeacherError, match="token classifier"):
        load_teacher(tmp_path / "tok")


@pytest.mark.gpu
def test_auto_device_is_cuda(hf_dirs):
    teacher = load_teacher(hf_dirs["bert"])
    assert teacher.device.startswith("cuda")
    batch = text_batch(hf_dirs["bert"], TEXTS[:8])
    with torch.no_grad():
        expected = reference_model(hf_dirs["bert"])(**batch).logits
    assert torch.allclose(teacher.logits(batch).cpu(), expected, rtol=0, atol=1e-4)
