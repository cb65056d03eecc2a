"""Preprocessing from the model's own metadata, and a baked teacher that carries it (#10).

A tiny conv teacher is run over images the tests write with Pillow; its accuracy with the
preprocessing read from a timm ``config.json``, a Hugging Face ``preprocessor_config.json`` or ONNX
``metadata_props`` must equal the accuracy computed here with an independent implementation of
that preprocessing (Pillow + numpy, nothing from calibrate_teacher.data).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from calibrate_teacher.baking import bake_temperature
from calibrate_teacher.collect import collect_logits
from calibrate_teacher.data import open_data
from calibrate_teacher.data.preprocess import PreprocessConfig
from calibrate_teacher.errors import InputError, OutputExistsError
from calibrate_teacher.metrics import calibration_metrics
from calibrate_teacher.teachers import load_teacher
from calibrate_teacher.teachers._preprocessing import (
    CLASSES_KEY,
    PREPROCESS_KEY,
    find_model_classes,
    find_model_preprocessing,
    hf_preprocess_values,
    set_onnx_metadata,
)
from calibrate_teacher.temperature import fit_temperature

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
CLASSES, SIZE = 3, 16
MEAN, STD = [0.2, 0.6, 0.4], [0.1, 0.3, 0.2]
IMAGE_W, IMAGE_H = 28, 22  # not square, not the model's size: resize and crop both matter


class TinyImageNet(torch.nn.Module):
    """Conv -> ReLU -> global average pool -> Linear, set by hand: class c = "bright in channel c".

    The conv passes each channel through less a threshold at the normalised value of pixel 0.9
    (with MEAN and STD), so a wrong mean/std moves every threshold and a wrong crop cuts blobs.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3, CLASSES)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(3)
            self.conv.weight.add_(0.01 * torch.randn_like(self.conv.weight))
            self.conv.bias.copy_(-(0.9 - torch.tensor(MEAN)) / torch.tensor(STD))
            self.fc.weight.copy_(10 * torch.eye(3) + 0.1 * torch.randn(3, 3))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_onnx(net: TinyImageNet, path: Path, *, fixed: bool) -> Path:
    """The net as ONNX (onnx.helper, no exporter); ``fixed``: input [batch, 3, 16, 16]."""

    def tensor(name, t):
        return numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)

    weights = [
        tensor("conv.w", net.conv.weight),
        tensor("conv.b", net.conv.bias),
        tensor("fc.w", net.fc.weight),
        tensor("fc.b", net.fc.bias),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    dims = ["batch", 3, SIZE, SIZE] if fixed else ["batch", 3, "height", "width"]
    graph = helper.make_graph(
        nodes,
        "tiny_image",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- independent reference preprocessing (Pillow + numpy) -------------------------------------


def normalise(image: Image.Image, mean, std) -> np.ndarray:
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def timm_reference(image, *, size, crop_pct, interpolation, mean, std) -> np.ndarray:
    """timm's eval transform: short side to floor(size / crop_pct), centre crop (torchvision)."""
    scale = math.floor(size / crop_pct)
    w, h = image.size
    new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    image = image.resize(new, interpolation)
    left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    return normalise(image.crop((left, top, left + size, top + size)), mean, std)


def hf_reference(image, *, size, crop, resample, mean, std, shortest_edge=False) -> np.ndarray:
    """A Hugging Face image processor: resize, centre crop at floor(margin / 2), normalise."""
    w, h = image.size
    new = (size, size)
    if shortest_edge:
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, resample)
    if crop is not None:
        left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    return normalise(image, mean, std)


def accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(1) == torch.as_tensor(labels)).double().mean())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """RGB images of IMAGE_W x IMAGE_H with a bright off-centre blob, in class folders.

    The label is the net's own prediction under the timm reference preprocessing for 80% of the
    images and a random class otherwise, so accuracy is high with the right preprocessing and
    visibly lower with another.
    """
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(36, IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        y, x = rng.integers(0, IMAGE_H - 6), rng.integers(0, IMAGE_W - 6)
        img[y : y + 6, x : x + 6, i % 3] = 255
    net = TinyImageNet().eval()
    pil = [Image.fromarray(p) for p in pixels]
    reference = np.stack([right_preprocessing(im) for im in pil])
    with torch.no_grad():
        predicted = net(torch.from_numpy(reference)).argmax(1).numpy()
    flip = rng.random(len(pil)) < 0.2
    labels = np.where(flip, rng.integers(0, CLASSES, len(pil)), predicted)
    root = tmp_path_factory.mktemp("images") / "val"
    keys = []
    for i, (im, label) in enumerate(zip(pil, labels, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        im.save(root / str(label) / f"{i:03d}.png")
        keys.append(f"{label}/{i:03d}.png")
    # Samples come back ordered by label, then key: keep the images in that order.
    order = sorted(range(len(pil)), key=lambda i: (int(labels[i]), keys[i]))
    return root, [pil[i] for i in order], labels[order], net


def measure(teacher_path: Path, data: Path):
    """Run a teacher file over a folder with what its own files give (as the jobs layer will)."""
    teacher = load_teacher(teacher_path, device="cpu")
    source = open_data(data, teacher=teacher, model_layers=find_model_preprocessing(teacher_path))
    return collect_logits(teacher, source, batch_size=16), source


def reference_logits(net, images, preprocess) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.from_numpy(np.stack([preprocess(im) for im in images])))


def right_preprocessing(image):
    """The preprocessing the test's teacher was made for: timm's, bicubic, crop_pct 0.8."""
    return timm_reference(image, size=SIZE, crop_pct=0.8, interpolation=Image.Resampling.BICUBIC, mean=MEAN, std=STD)


def right_logits(net, images) -> torch.Tensor:
    return reference_logits(net, images, right_preprocessing)


# --- metadata the model carries ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pretrained_cfg", "top_level"])
def test_timm_config_json_gives_the_accuracy_of_the_right_preprocessing(tmp_path, images, layout):
    root, pil, labels, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=False)
    cfg = {
        "input_size": [3, SIZE, SIZE],
        "interpolation": "bicubic",
        "crop_pct": 0.8,
        "crop_mode": "center",
        "mean": MEAN,
        "std": STD,
        "num_classes": CLASSES,
        "first_conv": "conv",
        "classifier": "fc",
        "test_input_size": [3, 24, 24],
    }
    hub = {"architecture": "tiny", "num_classes": CLASSES, "num_features": 3}
    hub.update({"pretrained_cfg": cfg} if layout == "pretrained_cfg" else cfg)
    (tmp_path / "config.json").write_text(json.dumps(hub))

    logits, source = measure(model, root)
    expected = right_logits(net, pil)
    torch.testing.assert_close(logits.logits, expected, atol=1e-4, rtol=0)
    assert accuracy(logits.logits, labels) == accuracy(expected, labels) >= 0.75
    assert source.description["preprocess_from"] == f"{tmp_path / 'config.json'} (timm pretrained_cfg) beside the model"
    assert source.description["preprocess_warnings"] == []


def test_timm_model_args_set_channels_and_fixed_size(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny",
                "model_args": {"in_chans": 1, "img_size": 32},
                "pretrained_cfg": {"input_size": [3, 224, 224], "fixed_input_size": True, "mean": [0.5]},
            }
        )
    )
    (layer,) = find_model_preprocessing(tmp_path / "m.safetensors")[1:]
    assert layer.values["input_size"] == [1, 32, 32]
    assert layer.declared


def test_timm_border_crop_mode_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "x", "pretrained_cfg": {"input_size": [3, 8, 8], "crop_mode": "border"}})
    )
    with pytest.raises(InputError, match=r"config.json: timm crop_mode 'border' cannot be reproduced"):
        find_model_preprocessing(tmp_path / "m.onnx")


HF_VIT = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": SIZE, "width": SIZE},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": MEAN,
    "image_std": STD,
}
HF_DEIT = {
    **HF_VIT,
    "image_processor_type": "DeiTImageProcessor",
    "size": {"height": 20, "width": 20},
    "resample": 2,
    "do_center_crop": True,
    "crop_size": {"height": SIZE, "width": SIZE},
}
HF_CONVNEXT = {
    **HF_VIT,
    "image_processor_type": "ConvNextImageProcessor",
    "size": {"shortest_edge": SIZE},
    "crop_pct": 0.8,
}


@pytest.mark.parametrize(
    ("config", "reference"),
    [
        (HF_VIT, {"size": SIZE, "crop": None, "resample": Image.Resampling.BICUBIC}),
        (HF_DEIT, {"size": 20, "crop": SIZE, "resample": Image.Resampling.BILINEAR}),
        # ConvNeXt: shortest edge to int(16 / 0.8) = 20, long side 25, crop 16 (margins 9 and 4:
        # the same offsets under floor and round).
        (HF_CONVNEXT, {"size": 20, "crop": SIZE, "resample": Image.Resampling.BICUBIC, "shortest_edge": True}),
    ],
    ids=["vit", "deit", "convnext"],
)
def test_hf_preprocessor_config_gives_the_accuracy_of_the_right_preprocessing(tmp_path, images, config, reference):
    root, pil, labels, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=False)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))

    logits, source = measure(model, root)
    expected = reference_logits(net, pil, lambda im: hf_reference(im, mean=MEAN, std=STD, **reference))
    torch.testing.assert_close(logits.logits, expected, atol=1e-4, rtol=0)
    assert accuracy(logits.logits, labels) == accuracy(expected, labels)
    kind = config["image_processor_type"]
    assert source.description["preprocess_from"] == (
        f"{tmp_path / 'preprocessor_config.json'} (Hugging Face {kind}) beside the model"
    )
    assert source.description["preprocess_warnings"] == []


def test_hf_legacy_vit_feature_extractor_with_integer_size():
    legacy = {
        "feature_extractor_type": "ViTFeatureExtractor",
        "do_resize": True,
        "size": 224,
        "resample": 2,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    assert hf_preprocess_values(legacy, source="p.json") == {
        "crop_mode": "squash",
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "input_size": [3, 224, 224],
    }


def test_hf_rescale_is_folded_into_mean_and_std():
    # (x - 127.5) / 127.5 on 0..255 pixels is (x / 255 - 0.5) / 0.5.
    raw = {
        "image_processor_type": "ViTImageProcessor",
        "size": {"height": 8, "width": 8},
        "do_rescale": False,
        "image_mean": [127.5] * 3,
        "image_std": [127.5] * 3,
    }
    values = hf_preprocess_values(raw, source="p.json")
    assert values["mean"] == pytest.approx([0.5] * 3) and values["std"] == pytest.approx([0.5] * 3)
    plain = {**raw, "do_normalize": False}
    values = hf_preprocess_values(plain, source="p.json")
    assert values["mean"] == [0.0] * 3 and values["std"] == pytest.approx([1 / 255] * 3)


def test_hf_keys_left_out_are_reported_as_defaults(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "ViTImageProcessor", "size": {"height": 8, "width": 8}})
    )
    from calibrate_teacher.data.preprocess import resolve_preprocess

    model = tmp_path / "m.onnx"
    resolved = resolve_preprocess(model_layers=find_model_preprocessing(model), model_path=model)
    assert resolved.from_defaults == ("interpolation", "mean", "std")
    assert "interpolation, mean, std from defaults (not given by" in resolved.warnings[0]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"do_resize": False}, "do_resize=false"),
        ({"do_pad": True}, "do_pad=true"),
        ({"size": {"shortest_edge": 16}}, "shortest_edge resize without a centre crop"),
        ({"do_center_crop": True, "crop_size": {"height": 8, "width": 12}}, "not the same fraction"),
        (
            {"size": {"shortest_edge": 16}, "do_center_crop": True, "crop_size": {"height": 8, "width": 12}},
            "non-square crop",
        ),
        ({"image_processor_type": "FancyImageProcessor", "size": 16}, "an integer size with FancyImageProcessor"),
        ({"crop_pct": 0.9}, "crop_pct with ViTImageProcessor"),
        ({"resample": 7}, "resample=7"),
        (
            {"do_rescale": True, "rescale_factor": 0.5, "image_mean": None, "image_std": None},
            "rescale_factor=0.5 without image_mean",
        ),
        ({"size": {"shortest_edge": 16, "longest_edge": 20}}, "size="),
    ],
)
def test_hf_settings_we_cannot_reproduce_are_refused(change, match):
    config = {**HF_VIT, **change}
    with pytest.raises(InputError, match=rf"p.json: .*{match}.*cannot be reproduced.*preprocess.json"):
        hf_preprocess_values(config, source="p.json")


def test_onnx_metadata_gives_the_accuracy_of_the_right_preprocessing(tmp_path, images):
    root, pil, labels, net = images
    model_path = tiny_onnx(net, tmp_path / "model.onnx", fixed=True)
    model = onnx.load(str(model_path))
    keys = {"interpolation": "bicubic", "crop_pct": 0.8, "crop_mode": "center", "mean": MEAN, "std": STD}
    set_onnx_metadata(model, preprocess=keys, classes=["a", "b", "c"])
    onnx.save(model, str(model_path))

    logits, source = measure(model_path, root)
    expected = right_logits(net, pil)
    torch.testing.assert_close(logits.logits, expected, atol=1e-4, rtol=0)
    assert accuracy(logits.logits, labels) == accuracy(expected, labels)
    assert source.description["preprocess_from"] == (
        f"input shape of model.onnx: input_size; metadata_props[{PREPROCESS_KEY!r}] of {model_path}: "
        "interpolation, crop_pct, crop_mode, mean, std"
    )
    assert source.description["preprocess_warnings"] == []
    assert find_model_classes(model_path) == (("a", "b", "c"), f"metadata_props[{CLASSES_KEY!r}] of model.onnx")


def test_nothing_beside_the_model_warns_and_measures_worse(tmp_path, images):
    root, pil, labels, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=True)
    logits, source = measure(model, root)
    assert source.description["preprocess_from"] == (
        "input shape of model.onnx: input_size; defaults: interpolation, crop_pct, crop_mode, mean, std"
    )
    (warning,) = source.description["preprocess_warnings"]
    assert warning.startswith(
        "preprocessing: interpolation, crop_pct, crop_mode, mean, std from defaults (no sidecar or "
        "model metadata found beside model.onnx); write model.preprocess.json beside the model or pass --preprocess"
    )
    right = right_logits(net, pil)
    assert accuracy(logits.logits, labels) < accuracy(right, labels)  # the preprocessing matters


def test_declared_input_size_contradicting_the_model_or_sidecar_is_an_error(tmp_path, images):
    root, _, _, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=True)  # [batch, 3, 16, 16]
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "tiny", "pretrained_cfg": {"input_size": [3, 20, 20]}})
    )
    with pytest.raises(
        InputError, match=r"input shape does not fit model.onnx: expected \(3, 16, 16\) got \(3, 20, 20\)"
    ):
        measure(model, root)
    dynamic = tiny_onnx(net, tmp_path / "model.onnx", fixed=False)
    (tmp_path / "model.preprocess.json").write_text(json.dumps({"input_size": [3, 16, 16]}))
    with pytest.raises(
        InputError,
        match=r"model.preprocess.json beside the model sets input_size \[3, 16, 16\] "
        r"but .*config.json \(timm pretrained_cfg\) .* declares \[3, 20, 20\]",
    ):
        measure(dynamic, root)
    # An explicit --input-size is the user's choice, reported as such.
    teacher = load_teacher(dynamic, device="cpu")
    source = open_data(
        root, teacher=teacher, model_layers=find_model_preprocessing(dynamic), overrides={"input_size": (3, 16, 16)}
    )
    assert "overrides: input_size" in source.description["preprocess_from"]


# --- the baked teacher carries its preprocessing ----------------------------------------------


@pytest.fixture
def digits(tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(DIGITS, copy, ignore=shutil.ignore_patterns("train", "*.safetensors", "*.py"))
    return copy


def test_baked_example_evaluates_as_the_original_at_t(digits):
    original, source = measure(digits / "teacher.onnx", digits / "val")
    fit = fit_temperature(original.logits, original.labels)
    t = fit.temperature
    result = bake_temperature(digits / "teacher.onnx", t, digits / "teacher.calibrated.onnx", device="cpu")

    sidecar = digits / "teacher.calibrated.preprocess.json"
    assert sidecar in result.extra_files
    assert json.loads(sidecar.read_text()) == json.loads((digits / "teacher.preprocess.json").read_text())
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(meta[PREPROCESS_KEY]) == json.loads(sidecar.read_text())

    baked, baked_source = measure(result.path, digits / "val")
    assert baked_source.description["preprocess"] == source.description["preprocess"]
    assert baked_source.description["preprocess_warnings"] == []
    after = calibration_metrics(baked.logits, baked.labels)
    at_t = calibration_metrics(original.logits, original.labels, temperature=t)
    assert after.ece == pytest.approx(at_t.ece, abs=1e-6)
    assert after.ece == pytest.approx(fit.after.ece, abs=1e-6)
    assert after.accuracy == at_t.accuracy == pytest.approx(0.971, abs=1e-3)

    # Only the ONNX metadata left: the baked teacher still finds its preprocessing.
    sidecar.unlink()
    again, again_source = measure(result.path, digits / "val")
    assert again_source.description["preprocess"] == source.description["preprocess"]
    torch.testing.assert_close(again.logits, baked.logits)


def test_baked_torchscript_carries_the_sidecar_and_class_list(digits):
    out = digits / "out" / "teacher.calibrated.pt"
    out.parent.mkdir()
    result = bake_temperature(digits / "teacher.pt", 1.5, out, device="cpu", classes=[str(i) for i in range(10)])
    assert (out.parent / "teacher.calibrated.preprocess.json").is_file()
    assert (out.parent / "teacher.calibrated.classes.txt").read_text().split() == [str(i) for i in range(10)]
    assert find_model_classes(out) == (
        tuple(str(i) for i in range(10)),
        f"{out.parent / 'teacher.calibrated.classes.txt'} beside the model",
    )
    original, _ = measure(digits / "teacher.pt", digits / "val")
    baked, _ = measure(result.path, digits / "val")
    torch.testing.assert_close(baked.logits, original.logits / 1.5, atol=1e-5, rtol=1e-5)


def test_bake_respects_overwrite_for_the_sidecar(digits):
    out = digits / "teacher.calibrated.onnx"
    stale = digits / "teacher.calibrated.preprocess.json"
    stale.write_text("{}")
    with pytest.raises(OutputExistsError, match=r"teacher.calibrated.preprocess.json: already exists"):
        bake_temperature(digits / "teacher.onnx", 1.5, out, device="cpu")
    assert not out.exists()
    bake_temperature(digits / "teacher.onnx", 1.5, out, device="cpu", overwrite=True)
    assert json.loads(stale.read_text())["input_size"] == [1, 16, 16]


def test_bake_without_preprocessing_leaves_none_and_removes_a_stale_one(tmp_path, images):
    _, _, _, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=True)
    out = tmp_path / "model.calibrated.onnx"
    result = bake_temperature(model, 2.0, out, device="cpu")
    assert result.extra_files == ()
    assert PREPROCESS_KEY not in {p.key for p in onnx.load(str(out)).metadata_props}
    stale = tmp_path / "model.calibrated.preprocess.json"
    stale.write_text(json.dumps({"mean": 0.5}))
    bake_temperature(model, 2.0, out, device="cpu", overwrite=True)
    assert not stale.exists()  # else the baked teacher would read what the original never had


def test_bake_with_an_explicit_config(tmp_path, images):
    _, _, _, net = images
    model = tiny_onnx(net, tmp_path / "model.onnx", fixed=True)
    config = PreprocessConfig(input_size=(3, SIZE, SIZE), interpolation="bicubic", mean=MEAN, std=STD)
    result = bake_temperature(model, 2.0, tmp_path / "b.onnx", device="cpu", preprocess=config)
    assert json.loads((tmp_path / "b.preprocess.json").read_text()) == config.to_json()
    assert tmp_path / "b.preprocess.json" in result.extra_files
