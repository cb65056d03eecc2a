"""Baking a Hugging Face model directory into a directory (#11 item 4).

The reference is always transformers itself: the baked directory reloaded with
``AutoModelFor...from_pretrained`` must give the original's logits / T on inputs the bake never
saw (other texts / images than the probe).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _hf_fixtures import LABELS, TEXTS, hf_dirs, make_images, reference_model, text_batch

from calibrate_teacher.baking import bake_temperature, default_baked_path
from calibrate_teacher.errors import BakeError, InvalidValueError, OutputExistsError
from calibrate_teacher.teachers import _hf_bake, find_model_classes, load_teacher

__all__ = ["hf_dirs"]

T = 2.5
HEADS = {"bert": "classifier", "distilbert": "classifier", "roberta": "classifier.out_proj", "vit": "classifier"}
CARRIED = {
    "bert": ("tokenizer.json", "tokenizer_config.json"),
    "distilbert": ("tokenizer.json", "tokenizer_config.json"),
    "roberta": ("tokenizer.json", "tokenizer_config.json"),
    "vit": ("preprocessor_config.json",),
}


def _probe(kind: str, directory: Path) -> dict[str, torch.Tensor]:
    if kind == "vit":
        return {"pixel_values": make_images(8, seed=7)[0]}
    return text_batch(directory, TEXTS[:8])


def _held_out(kind: str, directory: Path) -> dict[str, torch.Tensor]:
    if kind == "vit":
        return {"pixel_values": make_images(16, seed=11)[0]}
    return text_batch(directory, TEXTS[32:48])


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "vit"])
def test_baked_directory_reloads_with_logits_over_t(hf_dirs, tmp_path, kind):
    source = hf_dirs[kind]
    out = tmp_path / f"{kind}-calibrated"
    result = bake_temperature(source, T, out, probe=_probe(kind, source))
    assert result.path == out and result.format == "hf"
    assert result.head == HEADS[kind]
    assert result.max_abs_error <= result.tolerance <= 1e-4
    batch = _held_out(kind, source)
    image = kind == "vit"
    with torch.no_grad():
        expected = reference_model(source, image=image)(**batch).logits / T
        got = reference_model(out, image=image)(**batch).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    for name in CARRIED[kind]:  # tokenizer / preprocessor files carried byte for byte
        assert (out / name).read_bytes() == (source / name).read_bytes()
    record = json.loads((out / "calibration.json").read_text())
    assert record["temperature"] == T and record["head"] == HEADS[kind]
    assert json.loads((out / "config.json").read_text())["calibrate_teacher_temperature"] == T
    assert (out / "model.safetensors").is_file()
    assert find_model_classes(out)[0] == LABELS
    # No staging folder or stray temporary file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    # And it loads as a teacher again.
    assert torch.allclose(load_teacher(out).logits(batch), expected, rtol=0, atol=1e-5)
    json.dumps(result.to_json())


def test_default_path_and_overwrite(hf_dirs, tmp_path):
    source = tmp_path / "bert.v2"
    shutil.copytree(hf_dirs["bert"], source)
    assert default_baked_path(source) == tmp_path / "bert.v2-calibrated"
    probe = _probe("bert", source)
    first = bake_temperature(source, T, default_baked_path(source), probe=probe)
    with pytest.raises(OutputExistsError, match="overwrite"):
        bake_temperature(source, 1.5, first.path, probe=probe)
    assert json.loads((first.path / "calibration.json").read_text())["temperature"] == T
    again = bake_temperature(source, 1.5, first.path, probe=probe, overwrite=True)
    assert json.loads((again.path / "calibration.json").read_text())["temperature"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.v2", "bert.v2-calibrated"]
    with pytest.raises(InvalidValueError, match="inside it"):
        bake_temperature(source, T, source / "baked", probe=probe)


def test_failed_verification_leaves_nothing_behind(hf_dirs, tmp_path, monkeypatch):
    # A fold that claims success but changes nothing: the reload check must catch it.
    monkeypatch.setattr(_hf_bake, "_fold_classifier", lambda *args, **kwargs: "classifier")
    out = tmp_path / "out"
    with pytest.raises(BakeError, match="nothing was written"):
        bake_temperature(hf_dirs["distilbert"], T, out, probe=_probe("distilbert", hf_dirs["distilbert"]))
    assert list(tmp_path.iterdir()) == []


def test_unknown_architecture_head_is_found_by_the_probe(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(_hf_bake, "KNOWN_HEADS", {})
    source = hf_dirs["roberta"]
    result = bake_temperature(source, T, tmp_path / "out", probe=_probe("roberta", source))
    assert result.head == "classifier.out_proj"  # the last Linear, proven exact
    batch = _held_out("roberta", source)
    with torch.no_grad():
        expected = reference_model(source)(**batch).logits / T
        got = reference_model(result.path)(**batch).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_head_option_and_a_wrong_head(hf_dirs, tmp_path):
    source = hf_dirs["bert"]
    probe = _probe("bert", source)
    with pytest.raises(InvalidValueError, match=r"no nn\.Linear"):
        bake_temperature(source, T, tmp_path / "a", probe=probe, head="nope")
    # The pooler is a Linear too, but 1/T there goes through tanh: the probe refuses it.
    with pytest.raises(BakeError, match="folds 1/T exactly"):
        bake_temperature(source, T, tmp_path / "b", probe=probe, head="bert.pooler.dense")
    assert list(tmp_path.iterdir()) == []


def test_classes_are_recorded_as_id2label(hf_dirs, tmp_path):
    source = hf_dirs["distilbert"]
    out = bake_temperature(source, T, tmp_path / "o", probe=_probe("distilbert", source), classes=["n", "m", "p"]).path
    assert find_model_classes(out)[0] == ("n", "m", "p")
    with pytest.raises(InvalidValueError, match="3 outputs"):
        bake_temperature(source, T, tmp_path / "x", probe=_probe("distilbert", source), classes=["a"])


def test_random_probe_is_noted(hf_dirs, tmp_path):
    result = bake_temperature(hf_dirs["vit"], T, tmp_path / "o")
    assert any("no probe batch given" in n for n in result.notes)
    assert result.probe_shape == (4, 3, 16, 16)


def test_pickles_and_hidden_files_are_not_carried(hf_dirs, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(hf_dirs["distilbert"], source)
    (source / "training_args.bin").write_bytes(b"\x80\x04N.")
    (source / ".cache").mkdir()
    (source / "README.md").write_text("# teacher\n")
    (source / "extras").mkdir()
    (source / "extras" / "notes.txt").write_text("x")
    result = bake_temperature(source, T, tmp_path / "out", probe=_probe("distilbert", source))
    names = sorted(p.name for p in result.path.iterdir())
    assert "training_args.bin" not in names and ".cache" not in names
    assert "README.md" in names and (result.path / "extras" / "notes.txt").read_text() == "x"
    assert any("training_args.bin" in n and "not carried" in n for n in result.notes)


def test_bin_weights_bake_into_safetensors(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    source = tmp_path / "bin"
    shutil.copytree(hf_dirs["bert"], source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    result = bake_temperature(source, T, tmp_path / "out", probe=_probe("bert", source))
    names = {p.name for p in result.path.iterdir()}
    assert "model.safetensors" in names and "pytorch_model.bin" not in names


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    directory = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_causal_lm_bakes_through_the_lm_head_hook(tiny_gpt2, tmp_path):
    pytest.importorskip("calibrate_teacher.teachers._lm_head")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = bake_temperature(tiny_gpt2, T, tmp_path / "lm", probe=probe)
    held = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()(input_ids=held).logits / T
        got = AutoModelForCausalLM.from_pretrained(result.path).eval()(input_ids=held).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_bfloat16_directory_bakes_in_bfloat16(hf_dirs, tmp_path):
    source = tmp_path / "bf16"
    reference_model(hf_dirs["bert"]).to(torch.bfloat16).save_pretrained(source)
    for name in CARRIED["bert"]:
        shutil.copy(hf_dirs["bert"] / name, source)
    result = bake_temperature(source, T, tmp_path / "out", probe=_probe("bert", source))
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    batch = _held_out("bert", source)
    with torch.no_grad():
        expected = reference_model(source)(**batch).logits.float() / T
        got = reference_model(result.path)(**batch).logits.float()
    assert got.dtype == torch.float32
    # bf16 weights / T round once: within bf16's resolution of the logits, not float32's.
    assert torch.allclose(got, expected, rtol=0, atol=5e-2 * max(1.0, float(expected.abs().max())))
