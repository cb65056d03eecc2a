"""Loading teachers (issue 3): one contract over every format, softmax handling, bad inputs."""

from __future__ import annotations

import pickle

import _teacher_fixtures as fx
import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError
from calibrate_teacher.teachers import TEACHER_SUFFIXES, load_teacher
from calibrate_teacher.teachers import _onnx as onnx_backend
from calibrate_teacher.teachers._files import detect_format
from calibrate_teacher.teachers.base import Teacher

ARCH, FORMATS, arch_for = fx.ARCH, fx.FORMATS, fx.arch_for
needs_cuda = pytest.mark.gpu  # auto-skipped without CUDA (tests/conftest.py)


@pytest.fixture(scope="module")
def net():
    return fx.tiny_net()


@pytest.fixture(scope="module")
def files(tmp_path_factory, net):
    return fx.save_every_format(net, tmp_path_factory.mktemp("teachers"))


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text
    assert text
    return text


@pytest.mark.parametrize("fmt", FORMATS)
def test_contract_logits_equal_the_reference_module(files, net, fmt):
    teacher = load_teacher(files[fmt], device="cpu", arch=arch_for(fmt))
    assert isinstance(teacher, Teacher)
    assert teacher.format == fmt
    assert teacher.num_classes == fx.CLASSES
    assert teacher.device == "cpu"
    assert teacher.path == files[fmt]
    assert teacher.notes == []
    x = fx.inputs(7)
    got = teacher.logits(x)
    assert got.dtype == torch.float32
    assert got.shape == (7, fx.CLASSES)
    assert got.device.type == "cpu"
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_detect_format_by_suffix_and_content(files):
    assert {fmt: detect_format(p, arch=arch_for(fmt)) for fmt, p in files.items()} == {
        f: f for f in FORMATS
    }
    assert set(TEACHER_SUFFIXES) == {
        ".onnx",
        ".pt",
        ".pth",
        ".torchscript",
        ".jit",
        ".safetensors",
        ".pt2",
    }


def test_onnx_reports_provider_and_input_spec(files):
    teacher = load_teacher(files["onnx"], device="cpu")
    assert teacher.provider == "CPUExecutionProvider"
    assert teacher.input_spec.name == "input"
    assert teacher.input_spec.shape == (None, fx.IN_FEATURES)
    assert teacher.input_spec.dtype == "float32"


def test_export_input_spec_comes_from_the_program(files):
    spec = load_teacher(files["export"], device="cpu").input_spec
    assert spec.shape == (None, fx.IN_FEATURES)
    assert spec.dtype == "float32"


@pytest.mark.parametrize("ending", ["softmax", "manual", "manual_stable"])
def test_softmax_terminated_onnx_gives_pre_softmax_logits(tmp_path, net, ending):
    path = fx.save_onnx(fx.onnx_model(net, ending=ending), tmp_path / "probs.onnx")
    teacher = load_teacher(path, device="cpu")
    assert teacher.output == "probs"
    assert teacher.logits_tensor == "logits"
    x = fx.inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x), net(x), atol=1e-5, rtol=0)


def test_multi_output_default_and_output_option(tmp_path, net):
    path = fx.save_onnx(fx.onnx_model(net, ending="multi"), tmp_path / "multi.onnx")
    x = fx.inputs(4)
    with torch.no_grad():
        logits, features = net(x), net.act(net.body(x))
    assert load_teacher(path, device="cpu").output == "logits"  # named "logits" beats "features"
    probs = load_teacher(path, device="cpu", output="probs")
    torch.testing.assert_close(probs.logits(x), logits, atol=1e-5, rtol=0)  # read before Softmax
    feats = load_teacher(path, device="cpu", output="features")
    assert feats.num_classes == fx.HIDDEN
    torch.testing.assert_close(feats.logits(x), features, atol=1e-5, rtol=0)
    with pytest.raises(TeacherError, match="features float32") as exc:
        load_teacher(path, device="cpu", output="nope")
    one_line(exc)


def test_onnx_probabilities_without_a_visible_softmax_are_refused(tmp_path, net):
    model = fx.onnx_model(net, ending="softmax")
    graph = model.graph
    graph.node[-1].output[0] = "p0"  # Softmax -> Mul by 1: numerically probabilities, no pattern
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    graph.node.append(helper.make_node("Mul", ["p0", "one"], ["probs"]))
    path = fx.save_onnx(model, tmp_path / "hidden.onnx")
    with pytest.raises(TeacherError, match="probabilities") as exc:
        load_teacher(path, device="cpu").logits(fx.inputs(3))
    one_line(exc)


def test_softmax_module_is_seen_through_for_arch_and_export(tmp_path):
    net = fx.tiny_net(softmax=True)
    x = fx.inputs(5)
    with torch.no_grad():
        expected = net.head(net.act(net.body(x)))
    st = fx.save_safetensors(net, tmp_path / "sm.safetensors")
    arch = load_teacher(st, device="cpu", arch=ARCH, arch_kwargs='{"softmax": true}')
    torch.testing.assert_close(arch.logits(x), expected, atol=1e-5, rtol=0)
    export = load_teacher(fx.save_export(net, tmp_path / "sm.pt2", x), device="cpu")
    torch.testing.assert_close(export.logits(x), expected, atol=1e-5, rtol=0)


def test_torchscript_probabilities_are_refused(tmp_path):
    path = fx.save_torchscript(fx.tiny_net(softmax=True), tmp_path / "sm.pt")
    with pytest.raises(TeacherError, match="no pre-softmax tensor") as exc:
        load_teacher(path, device="cpu")
    one_line(exc)


def test_torchscript_image_model_is_probed_from_its_first_conv(tmp_path):
    conv = fx.tiny_conv()
    teacher = load_teacher(fx.save_torchscript(conv, tmp_path / "conv.pt"), device="cpu")
    assert teacher.num_classes == fx.CLASSES
    assert teacher.input_spec is None
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 12, 12))).float()
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x), conv(x), atol=1e-5, rtol=0)


def test_state_dict_nested_with_data_parallel_prefix(tmp_path, net):
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    teacher = load_teacher(tmp_path / "ckpt.pth", device="cpu", arch=ARCH)
    x = fx.inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x), net(x), atol=1e-6, rtol=0)


def test_arch_kwargs_mapping_and_json(tmp_path):
    net = fx.tiny_net(num_classes=3)
    path = fx.save_safetensors(net, tmp_path / "c3.safetensors")
    assert (
        load_teacher(path, device="cpu", arch=ARCH, arch_kwargs={"num_classes": 3}).num_classes == 3
    )
    assert (
        load_teacher(path, device="cpu", arch=ARCH, arch_kwargs='{"num_classes": 3}').num_classes
        == 3
    )


def test_notes_for_duplicate_onnxruntime_and_ignored_arch(files, monkeypatch):
    monkeypatch.setattr(onnx_backend, "_installed", lambda name: True)
    notes = load_teacher(files["onnx"], device="cpu", arch=ARCH).notes
    assert len(notes) == 2
    assert "onnxruntime and onnxruntime-gpu" in notes[0]
    assert "pip uninstall" in notes[0]
    assert "--arch ignored" in notes[1]
    monkeypatch.setattr(onnx_backend, "_installed", lambda name: name == "onnxruntime-gpu")
    assert load_teacher(files["onnx"], device="cpu").notes == []


def _bad_files(d, files):
    """name -> (path, kwargs, error type, message fragment)."""
    rng = np.random.default_rng(0)
    (d / "random.onnx").write_bytes(rng.bytes(4096))
    (d / "random.pt").write_bytes(rng.bytes(4096))
    (d / "random.safetensors").write_bytes(rng.bytes(4096))
    (d / "truncated.onnx").write_bytes(files["onnx"].read_bytes()[:300])
    (d / "truncated.pt2").write_bytes(files["export"].read_bytes()[:300])
    (d / "empty.onnx").write_bytes(b"")
    (d / "model.h5").write_bytes(b"\x89HDF\r\n")
    with open(d / "pickled.pt", "wb") as fh:
        pickle.dump({"weights": [1.0, 2.0]}, fh, protocol=4)
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "module.pt")  # a pickled nn.Module
    return {
        "missing file": (d / "nope.onnx", {}, InputError, "does not exist"),
        "unknown suffix": (d / "model.h5", {}, InputError, "names no format we read"),
        "empty": (d / "empty.onnx", {}, InputError, "empty"),
        "random onnx": (d / "random.onnx", {}, InputError, "not an ONNX model"),
        "truncated onnx": (d / "truncated.onnx", {}, InputError, "not a valid ONNX model"),
        "random pt": (d / "random.pt", {}, InputError, "neither TorchScript"),
        "random safetensors": (d / "random.safetensors", {"arch": ARCH}, InputError, "safetensors"),
        "truncated pt2": (d / "truncated.pt2", {}, InputError, "zip"),
        "pickle without arch": (d / "pickled.pt", {}, InputError, "never unpickled"),
        "pickle with arch": (d / "pickled.pt", {"arch": ARCH}, TeacherError, "weights_only"),
        "pickled module": (d / "module.pt", {"arch": ARCH}, TeacherError, "weights_only"),
        "safetensors without arch": (files["safetensors"], {}, TeacherError, "--arch"),
        "arch syntax": (
            files["safetensors"],
            {"arch": "no_colon"},
            InvalidValueError,
            "pkg.module:factory",
        ),
        "arch module": (
            files["safetensors"],
            {"arch": "not_a_pkg.sub:f"},
            TeacherError,
            "cannot import",
        ),
        "arch attribute": (
            files["safetensors"],
            {"arch": f"{fx.FIXTURES_FILE}:nope"},
            TeacherError,
            "no attribute",
        ),
        "arch file": (
            files["safetensors"],
            {"arch": str(d / "none.py") + ":f"},
            TeacherError,
            "does not exist",
        ),
        "arch kwargs json": (
            files["safetensors"],
            {"arch": ARCH, "arch_kwargs": "{num"},
            InvalidValueError,
            "JSON",
        ),
        "arch kwargs names": (
            files["safetensors"],
            {"arch": ARCH, "arch_kwargs": {"width": 3}},
            TeacherError,
            "width",
        ),
        "missing + unexpected keys": (
            files["safetensors"],
            {"arch": f"{fx.FIXTURES_FILE}:tiny_conv"},
            TeacherError,
            "4 missing (conv.weight, conv.bias, fc.weight, fc.bias); 4 unexpected",
        ),
        "shape mismatch": (
            files["safetensors"],
            {"arch": ARCH, "arch_kwargs": {"num_classes": 3}},
            TeacherError,
            "head.weight: file (5, 16) vs model (3, 16)",
        ),
        "bad device": (files["onnx"], {"device": "tpu"}, InvalidValueError, "cuda:N"),
    }


def test_bad_inputs_each_give_one_line(tmp_path, files):
    for name, (path, kwargs, kind, fragment) in _bad_files(tmp_path, files).items():
        with pytest.raises(kind) as exc:
            load_teacher(path, **{"device": "cpu", **kwargs})
        assert fragment in one_line(exc), (name, str(exc.value))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_teachers_match_the_reference(files, net, fmt):
    teacher = load_teacher(files[fmt], device="cuda", arch=arch_for(fmt))
    assert teacher.device.startswith("cuda")
    if fmt == "onnx":
        assert teacher.provider == "CUDAExecutionProvider"
    x = fx.inputs(7)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(teacher.logits(x.cuda()).cpu(), expected, atol=1e-4, rtol=0)


class _Fixed16(torch.nn.Module):
    """A conv net that only runs on 1 x 16 x 16 inputs (a Linear over the flattened map)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_torchscript_input_size_comes_from_the_preprocess_sidecar(tmp_path):
    path = fx.save_torchscript(_Fixed16().eval(), tmp_path / "m.pt")
    with pytest.raises(TeacherError, match="cannot work out the input shape"):
        load_teacher(path, device="cpu")
    (tmp_path / "m.preprocess.json").write_text('{"input_size": [1, 16, 16]}')
    teacher = load_teacher(path, device="cpu")
    assert teacher.num_classes == 4
    assert teacher.logits(torch.zeros(3, 1, 16, 16)).shape == (3, 4)
