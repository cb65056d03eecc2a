"""Preprocessing: timm pretrained_cfg keys, where they come from, and the Pillow/torch transform."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from calibrate_teacher.data.preprocess import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PreprocessConfig,
    resolve_preprocess,
)
from calibrate_teacher.data.transform import preprocess_image, resize_target
from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.teachers._preprocessing import find_model_preprocessing
from calibrate_teacher.teachers.base import InputSpec

# --- the transform, against hand-computed values ---------------------------------------------


def test_hand_computed_nearest_crop_normalise():
    # A 4 x 2 (W x H) RGB image. Target (3, 2, 2) with crop_pct 1: the square target keeps the
    # short side (2) and the long side int(2 * 4 / 2) = 4, so no resize; the centre crop starts
    # at round((4 - 2) / 2) = 1 and keeps columns 1 and 2.
    pixels = np.array(
        [
            [[0, 0, 0], [255, 0, 51], [102, 204, 255], [9, 9, 9]],
            [[9, 9, 9], [51, 102, 153], [0, 255, 0], [0, 0, 0]],
        ],
        dtype=np.uint8,
    )
    image = Image.fromarray(pixels, mode="RGB")
    config = PreprocessConfig(
        input_size=(3, 2, 2),
        interpolation="nearest",
        crop_pct=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 0.2),
    )
    out = preprocess_image(image, config)
    # (v / 255 - 0.5) / std, worked by hand:
    #   R: 255 -> 2.0, 102 -> -0.4, 51 -> -1.2, 0 -> -2.0       (std 0.25)
    #   G: 0 -> -1.0, 204 -> 0.6, 102 -> -0.2, 255 -> 1.0       (std 0.5)
    #   B: 51 -> -1.5, 255 -> 2.5, 153 -> 0.5, 0 -> -2.5        (std 0.2)
    expected = torch.tensor(
        [
            [[2.0, -0.4], [-1.2, -2.0]],
            [[-1.0, 0.6], [-0.2, 1.0]],
            [[-1.5, 2.5], [0.5, -2.5]],
        ]
    )
    assert out.dtype == torch.float32
    assert out.shape == (3, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_hand_computed_nearest_upscale_grayscale():
    # 2 x 2 grayscale, nearest, to (1, 4, 4) with crop_pct 1: each pixel becomes a 2 x 2 block.
    image = Image.fromarray(np.array([[0, 255], [51, 204]], dtype=np.uint8), mode="L")
    config = PreprocessConfig(
        input_size=(1, 4, 4), interpolation="nearest", crop_pct=1.0, mean=(0.0,), std=(1.0,)
    )
    out = preprocess_image(image, config)
    block = torch.tensor([[0.0, 1.0], [0.2, 0.8]])
    expected = block.repeat_interleave(2, 0).repeat_interleave(2, 1)[None]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_constant_image_resize_and_crop_pct():
    # Any interpolation keeps a constant image constant, so only the sizes and the normalisation
    # matter: 20 x 10 -> short side floor(7 / 0.875) = 8, long int(8 * 20 / 10) = 16, crop 7 x 7.
    image = Image.new("RGB", (20, 10), (200, 100, 50))
    config = PreprocessConfig(input_size=(3, 7, 7), interpolation="bicubic", crop_pct=0.875)
    out = preprocess_image(image, config)
    assert out.shape == (3, 7, 7)
    for c, v in enumerate((200, 100, 50)):
        value = (v / 255 - IMAGENET_DEFAULT_MEAN[c]) / IMAGENET_DEFAULT_STD[c]
        torch.testing.assert_close(out[c], torch.full((7, 7), value), atol=1e-5, rtol=0)


def test_crop_larger_than_image_pads_with_zero_pixels():
    # crop_pct 2: resize target floor(4 / 2) = 2 (no resize), then a 4 x 4 crop of a 2 x 2
    # image pads one zero pixel on each side, as torchvision's CenterCrop does.
    image = Image.new("L", (2, 2), 255)
    config = PreprocessConfig(input_size=(1, 4, 4), crop_pct=2.0, mean=(0.5,), std=(0.5,))
    out = preprocess_image(image, config)[0]
    expected = torch.full((4, 4), -1.0)
    expected[1:3, 1:3] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_bilinear_upscale_matches_an_independent_interpolation():
    # Pillow's bilinear upscale equals half-pixel bilinear interpolation up to its 8-bit
    # rounding: at most one grey level apart from torch's float implementation.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
    config = PreprocessConfig(
        input_size=(1, 12, 12), interpolation="bilinear", crop_pct=1.0, mean=(0.0,), std=(1.0,)
    )
    out = preprocess_image(Image.fromarray(pixels, mode="L"), config)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(pixels).float()[None, None] / 255,
        size=(12, 12),
        mode="bilinear",
        align_corners=False,
    )[0]
    assert float((out - reference).abs().max()) <= 1.0 / 255 + 1e-6


@pytest.mark.parametrize(
    ("size", "input_size", "crop_pct", "crop_mode", "expected"),
    [
        ((500, 375), (3, 224, 224), 0.875, "center", (341, 256)),  # landscape: short side 256
        ((375, 500), (3, 224, 224), 0.875, "center", (256, 341)),  # portrait
        ((300, 300), (3, 224, 224), 1.0, "center", (224, 224)),
        ((500, 375), (3, 224, 224), 0.875, "squash", (256, 256)),
        # non-square target: ResizeKeepRatio, ratio = min(375 / 128, 500 / 256) = 1.953125
        ((500, 375), (3, 112, 224), 0.875, "center", (256, 192)),
    ],
)
def test_resize_target_hand_cases(size, input_size, crop_pct, crop_mode, expected):
    config = PreprocessConfig(input_size=input_size, crop_pct=crop_pct, crop_mode=crop_mode)
    assert resize_target(*size, config) == expected


def test_modes_are_converted_to_the_configured_channels():
    config_rgb = PreprocessConfig(input_size=(3, 1, 1), crop_pct=1.0, mean=(0.0,), std=(1.0,))
    config_l = PreprocessConfig(input_size=(1, 1, 1), crop_pct=1.0, mean=(0.0,), std=(1.0,))
    # RGBA drops alpha; L repeats into three channels; RGB -> L is ITU-R 601-2 luma:
    # 255 * 299 / 1000 = 76.245 -> 76.
    rgba = preprocess_image(Image.new("RGBA", (1, 1), (10, 20, 30, 0)), config_rgb)
    assert (rgba.flatten() * 255).round().tolist() == [10, 20, 30]
    gray = preprocess_image(Image.new("L", (1, 1), 77), config_rgb)
    assert (gray.flatten() * 255).round().tolist() == [77, 77, 77]
    luma = preprocess_image(Image.new("RGB", (1, 1), (255, 0, 0)), config_l)
    assert (luma.flatten() * 255).round().tolist() == [76]


def test_palette_image_with_transparency_converts_without_warning():
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = b"\x00\xff" + b"\xff" * 254  # bytes form: Pillow warns on RGB
    out = preprocess_image(image, PreprocessConfig(input_size=(3, 2, 2), crop_pct=1.0))
    assert out.shape == (3, 2, 2)


# --- the config -------------------------------------------------------------------------------


def test_defaults_follow_the_channel_count():
    rgb = PreprocessConfig(input_size=(3, 224, 224))
    assert rgb.mean == IMAGENET_DEFAULT_MEAN
    assert rgb.std == IMAGENET_DEFAULT_STD
    gray = PreprocessConfig(input_size=(1, 28, 28))
    assert gray.mean == (pytest.approx(sum(IMAGENET_DEFAULT_MEAN) / 3, abs=1e-6),)
    assert PreprocessConfig(input_size=(3, 8, 8), mean=(0.5,)).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": (2, 8, 8)}, "1 \\(grayscale\\) or 3"),
        ({"input_size": (3, 8)}, "three positive integers"),
        ({"input_size": (3, 8, 8), "mean": (0.1, 0.2)}, "mean: has 2 values"),
        ({"input_size": (3, 8, 8), "std": (0.0,)}, "std > 0"),
        ({"input_size": (3, 8, 8), "interpolation": "cubic"}, "interpolation"),
        ({"input_size": (3, 8, 8), "crop_mode": "border"}, "crop_mode"),
        ({"input_size": (3, 8, 8), "crop_pct": 0.0}, "crop_pct"),
        ({"input_size": (3, 8, 8), "crop_pct": math.nan}, "crop_pct"),
    ],
)
def test_invalid_configs_name_the_key(kwargs, match):
    with pytest.raises(InvalidValueError, match=match):
        PreprocessConfig(**kwargs)


def test_from_dict_reads_timm_pretrained_cfg():
    cfg = {
        "url": "",
        "num_classes": 1000,
        "input_size": [3, 288, 288],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "first_conv": "conv1",
        "classifier": "fc",
    }
    config = PreprocessConfig.from_dict({"architecture": "x", "pretrained_cfg": cfg}, source="c")
    assert config == PreprocessConfig(
        input_size=(3, 288, 288),
        interpolation="bicubic",
        crop_pct=0.95,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def test_from_dict_refuses_typos_and_missing_input_size():
    with pytest.raises(InputError, match=r"did you mean 'crop_pct'"):
        PreprocessConfig.from_dict({"input_size": [3, 8, 8], "crop_pc": 1.0}, source="f.json")
    with pytest.raises(InputError, match=r"f.json: no input_size"):
        PreprocessConfig.from_dict({"crop_pct": 1.0}, source="f.json")
    with pytest.raises(InputError, match=r"f.json: .*mean: has 2 values"):
        PreprocessConfig.from_dict({"input_size": [3, 8, 8], "mean": [1, 2]}, source="f.json")
    with pytest.raises(InputError, match=r"input_size: expected integers"):
        PreprocessConfig.from_dict({"input_size": [3, 8.5, 8]}, source="f.json")


@settings(max_examples=40, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    h=st.integers(1, 512),
    w=st.integers(1, 512),
    interpolation=st.sampled_from(["nearest", "bilinear", "bicubic", "lanczos"]),
    crop_pct=st.floats(0.05, 1.0),
    crop_mode=st.sampled_from(["center", "squash"]),
    mean=st.floats(-1, 1),
    std=st.floats(0.01, 2),
)
def test_to_json_from_dict_round_trip(
    channels, h, w, interpolation, crop_pct, crop_mode, mean, std
):
    config = PreprocessConfig(
        input_size=(channels, h, w),
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        mean=(mean,),
        std=(std,),
    )
    text = json.dumps(config.to_json())
    assert PreprocessConfig.from_dict(json.loads(text), source="round trip") == config


# --- where the config comes from --------------------------------------------------------------

SPEC = InputSpec(name="input", shape=(None, 3, 32, 32), dtype="float32")


def resolve(tmp_path, name="m.onnx", **kwargs):
    """resolve_preprocess with the layers found beside tmp_path / name (as the jobs layer does)."""
    model = tmp_path / name
    return resolve_preprocess(model_layers=find_model_preprocessing(model), model_path=model, **kwargs)


def test_input_shape_alone_fills_input_size_and_warns(tmp_path):
    resolved = resolve(tmp_path, input_spec=SPEC)
    assert resolved.config == PreprocessConfig(input_size=(3, 32, 32))
    assert resolved.origin == "input shape of m.onnx: input_size; defaults: " + (
        "interpolation, crop_pct, crop_mode, mean, std"
    )
    assert resolved.from_defaults == ("interpolation", "crop_pct", "crop_mode", "mean", "std")
    (warning,) = resolved.warnings
    assert warning == (
        "preprocessing: interpolation, crop_pct, crop_mode, mean, std from defaults (no sidecar "
        "or model metadata found beside m.onnx); write m.preprocess.json beside the model or pass "
        "--preprocess (or --interpolation/--crop-pct/--crop-mode/--mean/--std)"
    )


@pytest.mark.parametrize("name", ["m.preprocess.json", "preprocess.json"])
def test_sidecar_beats_input_shape(tmp_path, name):
    (tmp_path / name).write_text(json.dumps({"input_size": [1, 16, 16], "mean": 0.5, "std": 0.5}))
    resolved = resolve(tmp_path, input_spec=SPEC)
    assert resolved.config.input_size == (1, 16, 16)
    assert resolved.config.mean == (0.5,)
    assert resolved.origin.startswith(f"{tmp_path / name} beside the model: input_size, mean, std")
    assert "defaults: interpolation, crop_pct, crop_mode" in resolved.origin
    (warning,) = resolved.warnings
    assert warning.startswith(
        f"preprocessing: interpolation, crop_pct, crop_mode from defaults (not given by {tmp_path / name}"
    )


def test_complete_sidecar_gives_no_warning(tmp_path):
    full = PreprocessConfig(input_size=(3, 8, 8), mean=(0.5,), std=(0.5,))
    (tmp_path / "m.preprocess.json").write_text(json.dumps(full.to_json()))
    resolved = resolve(tmp_path)
    assert resolved.config == full
    assert resolved.warnings == ()
    assert resolved.from_defaults == ()
    assert resolved.origin == f"{tmp_path / 'm.preprocess.json'} beside the model"


def test_stem_sidecar_wins_over_folder_sidecar(tmp_path):
    (tmp_path / "preprocess.json").write_text(json.dumps({"input_size": [3, 8, 8]}))
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"input_size": [3, 9, 9]}))
    assert resolve(tmp_path).config.input_size == (3, 9, 9)


def test_resolve_preprocess_never_looks_beside_the_model(tmp_path):
    # The lookup lives in teachers/_preprocessing.py; data/ only stacks what it is given.
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"input_size": [3, 9, 9]}))
    resolved = resolve_preprocess(model_path=tmp_path / "m.onnx", input_spec=SPEC)
    assert resolved.config.input_size == (3, 32, 32)


def test_hub_config_json_with_pretrained_cfg(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "resnet18", "pretrained_cfg": {"input_size": [3, 64, 64]}})
    )
    resolved = resolve(tmp_path, "model.safetensors")
    assert resolved.config == PreprocessConfig(input_size=(3, 64, 64), interpolation="bicubic")
    hub = tmp_path / "config.json"
    # What timm itself uses for the keys the file leaves out is timm's, not our guess.
    assert resolved.origin == (
        "timm's defaults for config.json: interpolation, crop_pct, crop_mode, mean, std; "
        f"{hub} (timm pretrained_cfg) beside the model: input_size"
    )
    assert resolved.warnings == ()


def test_unrelated_config_json_is_ignored(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3, "architectures": ["Bert"]}))
    assert find_model_preprocessing(tmp_path / "m.onnx") == ()
    assert resolve(tmp_path, input_spec=SPEC).config.input_size == (3, 32, 32)


def test_explicit_file_beats_sidecar_and_overrides_win(tmp_path):
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"input_size": [3, 9, 9], "std": 0.5}))
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps({"input_size": [3, 10, 10], "crop_pct": 0.5}))
    resolved = resolve(tmp_path, preprocess=explicit, overrides={"crop_pct": 1.0, "interpolation": None})
    assert resolved.config.input_size == (3, 10, 10)
    assert resolved.config.crop_pct == 1.0
    assert resolved.config.std == (0.5,) * 3
    assert resolved.origin == (
        f"{tmp_path / 'm.preprocess.json'} beside the model: std; {explicit}: input_size; "
        "overrides: crop_pct; defaults: interpolation, crop_mode, mean"
    )


def test_explicit_config_object(tmp_path):
    given_config = PreprocessConfig(input_size=(1, 5, 5), mean=(0.1,), std=(0.2,))
    resolved = resolve_preprocess(preprocess=given_config, input_spec=SPEC)
    assert resolved.config == given_config
    assert resolved.origin == "the given config"
    assert resolved.warnings == ()


def test_no_input_size_anywhere_is_a_clear_error(tmp_path):
    dynamic = InputSpec(name="x", shape=(None, 3, None, None), dtype="float32")
    with pytest.raises(InputError, match=r"cannot tell the input size for m.onnx.*--input-size"):
        resolve(tmp_path, input_spec=dynamic)
    resolved = resolve(tmp_path, input_spec=dynamic, overrides={"input_size": (3, 7, 7)})
    assert resolved.config.input_size == (3, 7, 7)


def test_bad_files_and_keys(tmp_path):
    with pytest.raises(InputError, match=r"no such preprocessing file"):
        resolve_preprocess(preprocess=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json: not a readable JSON file"):
        resolve_preprocess(preprocess=bad)
    with pytest.raises(InputError, match=r"override 'crop': unknown key"):
        resolve_preprocess(input_spec=SPEC, overrides={"crop": 1.0})
    (tmp_path / "m.preprocess.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"m.preprocess.json: expected a JSON object"):
        find_model_preprocessing(tmp_path / "m.onnx")
    (tmp_path / "m.preprocess.json").write_text('{"input_size": [3, 8, 8], "crop_pc": 1}')
    with pytest.raises(InputError, match=r"m.preprocess.json beside the model: unknown .*'crop_pct'"):
        resolve(tmp_path)
