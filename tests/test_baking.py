"""Baking T into teachers (issue 3): same format out, baked == original / T, nothing half-done."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import _teacher_fixtures as fx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate_teacher import baking
from calibrate_teacher._io import sha256_file
from calibrate_teacher.baking import BakeResult, bake_temperature, default_baked_path
from calibrate_teacher.cli import main
from calibrate_teacher.errors import BakeError, InvalidValueError, OutputExistsError
from calibrate_teacher.teachers import load_teacher

ARCH, FORMATS, arch_for = fx.ARCH, fx.FORMATS, fx.arch_for
T = 2.5
needs_cuda = pytest.mark.gpu  # auto-skipped without CUDA (tests/conftest.py)


@pytest.fixture(scope="module")
def net():
    return fx.tiny_net()


@pytest.fixture(scope="module")
def files(tmp_path_factory, net):
    return fx.save_every_format(net, tmp_path_factory.mktemp("teachers"))


def listing(d: Path):
    return sorted(p.name for p in d.iterdir())


def run_onnx(path, x, names=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x.numpy()}), strict=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_contract_baked_equals_original_over_t(tmp_path, files, net, fmt):
    src = files[fmt]
    out = tmp_path / f"baked{src.suffix}"
    result = bake_temperature(src, T, out, device="cpu", arch=arch_for(fmt))
    assert isinstance(result, BakeResult)
    assert (result.path, result.format, result.temperature, result.source) == (out, fmt, T, src)
    assert 0 <= result.max_abs_error <= 1e-5
    assert result.tolerance <= 1e-4
    assert result.probe_shape == (baking.PROBE_ROWS, fx.IN_FEATURES)
    assert result.head == {"onnx": "logits", "safetensors": "head", "state_dict": "head"}.get(fmt)
    assert listing(tmp_path) == [out.name]  # no temp or staging leftovers
    json.dumps(result.to_json(), allow_nan=False)
    # Independent check: the reloaded file against the reference module, on other batch sizes.
    baked = load_teacher(out, device="cpu", arch=arch_for(fmt))
    assert baked.format == fmt
    assert baked.num_classes == fx.CLASSES
    for n in (1, 9):
        x = fx.inputs(n)
        with torch.no_grad():
            expected = net(x) / T
        assert float((baked.logits(x) - expected).abs().max()) <= 1e-5
    with pytest.raises(OutputExistsError):
        bake_temperature(src, T, out, device="cpu", arch=arch_for(fmt))
    again = bake_temperature(src, 1.5, out, overwrite=True, device="cpu", arch=arch_for(fmt))
    assert again.temperature == 1.5
    assert listing(tmp_path) == [out.name]


def test_onnx_bake_keeps_names_opset_ir_and_dynamic_axes(tmp_path, files):
    out = tmp_path / "baked.onnx"
    bake_temperature(files["onnx"], T, out, device="cpu")
    before, after = onnx.load(str(files["onnx"])), onnx.load(str(out))
    assert after.ir_version == before.ir_version == fx.IR_VERSION
    assert [(o.domain, o.version) for o in after.opset_import] == [
        (o.domain, o.version) for o in before.opset_import
    ]
    assert after.graph.input == before.graph.input
    assert after.graph.output == before.graph.output
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [n.op_type for n in after.graph.node] == ["Gemm", "Relu", "Gemm", "Constant", "Div"]
    onnx.checker.check_model(after, full_check=True)


@settings(max_examples=12, deadline=None, database=None)
@given(temperature=st.floats(min_value=0.05, max_value=20.0))
def test_property_onnx_bake_divides_by_any_t(temperature):
    net = fx.tiny_net()
    x = fx.inputs(6)
    with tempfile.TemporaryDirectory() as d:
        src = fx.save_onnx(fx.onnx_model(net, ending="multi"), Path(d) / "m.onnx")
        bake_temperature(src, temperature, Path(d) / "b.onnx", device="cpu", output="probs")
        got = run_onnx(Path(d) / "b.onnx", x)
    with torch.no_grad():
        z = net(x).double() / temperature
        features = net.act(net.body(x))
    np.testing.assert_allclose(got["logits"], z.numpy(), atol=1e-5 * max(1, float(z.abs().max())))
    np.testing.assert_allclose(got["probs"], torch.softmax(z, 1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(got["features"], features.numpy())  # untouched


@pytest.mark.parametrize("ending", ["softmax", "manual", "manual_stable"])
def test_softmax_terminated_onnx_bakes_before_the_softmax(tmp_path, net, ending):
    src = fx.save_onnx(fx.onnx_model(net, ending=ending), tmp_path / "p.onnx")
    result = bake_temperature(src, T, tmp_path / "b.onnx", device="cpu")
    assert result.checked_probabilities
    assert result.head == "logits"
    x = fx.inputs(5)
    (probs,) = run_onnx(tmp_path / "b.onnx", x, ["probs"]).values()
    with torch.no_grad():
        expected = torch.softmax(net(x).double() / T, dim=1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    assert [o.name for o in onnx.load(str(tmp_path / "b.onnx")).graph.output] == ["probs"]


def test_external_data_onnx_is_edited_without_loading_and_copied(tmp_path, net, monkeypatch):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    src = fx.save_onnx(fx.onnx_model(net, ending="softmax"), src_dir / "big.onnx", external=True)
    data = src_dir / "big.onnx.weights"
    digest = sha256_file(data)
    loads = []
    real_load = onnx.load_model
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    result = bake_temperature(src, T, out_dir / "big.calibrated.onnx", device="cpu")
    monkeypatch.undo()
    assert loads
    assert all(k.get("load_external_data") is False for k in loads)
    assert result.extra_files == (out_dir / "big.calibrated.onnx.data",)
    assert listing(out_dir) == ["big.calibrated.onnx", "big.calibrated.onnx.data"]
    assert sha256_file(data) == digest
    assert not (out_dir / "big.calibrated.onnx.data").is_symlink()
    data.unlink()  # the baked model stands on its own copy
    onnx.checker.check_model(str(out_dir / "big.calibrated.onnx"), full_check=True)
    x = fx.inputs(4)
    (probs,) = run_onnx(out_dir / "big.calibrated.onnx", x).values()
    with torch.no_grad():
        expected = torch.softmax(net(x).double() / T, dim=1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)


def test_fp16_onnx_stays_fp16(tmp_path, net):
    src = fx.save_onnx(fx.onnx_model(net, fp16=True, ending="softmax"), tmp_path / "h.onnx")
    result = bake_temperature(src, T, tmp_path / "b.onnx", device="cpu")
    model = onnx.load(str(tmp_path / "b.onnx"))
    (constant,) = [n for n in model.graph.node if n.op_type == "Constant"]
    assert constant.attribute[0].t.data_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = fx.inputs(4).half()
    original = load_teacher(src, device="cpu").logits(x).double()
    baked = load_teacher(tmp_path / "b.onnx", device="cpu").logits(x).double()
    # Each side is rounded to fp16 once (2^-11 relative); onnxruntime may fuse the Div into the
    # Gemm, so the baked value is rounded from the unrounded product: at most two half-ulps apart.
    assert float(((baked - original / T).abs() / (original / T).abs()).max()) <= 2 * 2**-11
    assert 1e-5 < result.tolerance <= 1e-2 * max(1.0, float((original / T).abs().max()))


def test_safetensors_folds_t_into_the_head_only(tmp_path, net, files):
    from safetensors import safe_open

    out = tmp_path / "b.safetensors"
    bake_temperature(files["safetensors"], T, out, device="cpu", arch=ARCH)
    with safe_open(files["safetensors"], "pt") as a, safe_open(out, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert b.metadata() == {
            "calibrate_teacher.temperature": "2.5",
            "calibrate_teacher.head": "head",
        }
        for key in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            before, after = a.get_tensor(key), b.get_tensor(key)
            assert before.shape == after.shape
            assert before.dtype == after.dtype
            expected = (before.double() / T).float() if key.startswith("head.") else before
            assert torch.equal(after, expected), key


def test_explicit_head_tied_head_and_wrong_heads(tmp_path, files):
    src = files["safetensors"]
    assert (
        bake_temperature(
            src, T, tmp_path / "ok.safetensors", device="cpu", arch=ARCH, head="head"
        ).head
        == "head"
    )
    tied = fx.save_safetensors(fx.tied_net(), tmp_path / "tied.safetensors")
    cases = [
        (tied, {"arch": f"{fx.FIXTURES_FILE}:tied_net"}, BakeError, "tied to embed.weight"),
        (src, {"arch": ARCH, "head": "nope"}, BakeError, "does not exist"),
        (src, {"arch": ARCH, "head": "act"}, BakeError, "not nn.Linear"),
        (src, {"arch": ARCH, "head": "body"}, BakeError, "max |baked - original/T|"),
        (files["onnx"], {"head": "head"}, InvalidValueError, "only safetensors"),
    ]
    before = listing(tmp_path)
    for path, kwargs, kind, fragment in cases:
        with pytest.raises(kind) as exc:
            bake_temperature(path, T, tmp_path / f"x{path.suffix}", device="cpu", **kwargs)
        assert fragment in str(exc.value)
        assert "\n" not in str(exc.value)
    assert listing(tmp_path) == before


def test_softmax_module_arch_and_export_bake_before_the_softmax(tmp_path):
    net = fx.tiny_net(softmax=True)
    x = fx.inputs(5)
    with torch.no_grad():
        expected = torch.softmax(net.head(net.act(net.body(x))) / T, dim=1)
    st_src = fx.save_safetensors(net, tmp_path / "sm.safetensors")
    result = bake_temperature(
        st_src,
        T,
        tmp_path / "b.safetensors",
        device="cpu",
        arch=ARCH,
        arch_kwargs={"softmax": True},
    )
    assert result.checked_probabilities
    assert result.head == "head"
    pt2 = fx.save_export(net, tmp_path / "sm.pt2", x)
    assert bake_temperature(pt2, T, tmp_path / "b.pt2", device="cpu").checked_probabilities
    program = torch.export.load(str(tmp_path / "b.pt2")).module()
    for n in (2, 5, 11):  # the batch dimension stayed dynamic
        with torch.no_grad():
            got = program(fx.inputs(n))
            want = torch.softmax(net.head(net.act(net.body(fx.inputs(n)))) / T, dim=1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(program(x), expected, atol=1e-6, rtol=0)


def test_torchscript_wrapper_records_t(tmp_path, files):
    import warnings

    bake_temperature(files["torchscript"], T, tmp_path / "b.pt", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(tmp_path / "b.pt"))
    assert module.temperature == T
    assert module.original_name == "TemperatureScaled"


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_temperatures_write_nothing(tmp_path, files, temperature):
    with pytest.raises(InvalidValueError, match="finite number > 0"):
        bake_temperature(files["onnx"], temperature, tmp_path / "b.onnx", device="cpu")
    assert listing(tmp_path) == []


def test_bad_outputs_are_refused(tmp_path, files):
    existing = tmp_path / "b.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        bake_temperature(files["onnx"], T, existing, device="cpu")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InvalidValueError, match=r"give --out a \.onnx path"):
        bake_temperature(files["onnx"], T, tmp_path / "b.pt", device="cpu")
    with pytest.raises(InvalidValueError, match="is the teacher itself"):
        bake_temperature(files["onnx"], T, files["onnx"], overwrite=True, device="cpu")
    assert listing(tmp_path) == ["b.onnx"]


def test_default_baked_path():
    assert default_baked_path("/m/resnet.v2.onnx") == Path("/m/resnet.v2.calibrated.onnx")
    assert default_baked_path(Path("w.safetensors")) == Path("w.calibrated.safetensors")


# --- CLI -----------------------------------------------------------------------------------


def cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bake_json_and_table(tmp_path, files, net, capsys):
    out = tmp_path / "b.onnx"
    code, stdout, stderr = cli(
        ["bake", str(files["onnx"]), "-t", "2", "--out", str(out), "--json", "--device", "cpu"],
        capsys,
    )
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["path"] == str(out)
    assert document["temperature"] == 2.0
    assert document["format"] == "onnx"
    assert document["max_abs_error"] <= 1e-5
    code, stdout, _ = cli(
        [
            "bake",
            str(files["safetensors"]),
            "--temperature",
            "2",
            "--arch",
            ARCH,
            "--out",
            str(tmp_path / "b.safetensors"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0
    assert "written" in stdout
    assert "head" in stdout


def test_cli_passes_options_to_the_library(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(teacher_path, temperature, out, **kwargs):
        seen.update(teacher_path=teacher_path, temperature=temperature, out=out, **kwargs)
        return BakeResult(
            path=Path(out),
            format="onnx",
            temperature=temperature,
            max_abs_error=0.0,
            head=None,
            source=Path(teacher_path),
            tolerance=1e-5,
            notes=("a note",),
        )

    monkeypatch.setattr(baking, "bake_temperature", fake)
    code, _, stderr = cli(
        [
            "bake",
            "t.onnx",
            "-t",
            "1.5",
            "--overwrite",
            "--head",
            "fc",
            "--output",
            "logits",
            "--arch",
            "m:f",
            "--arch-kwargs",
            "{}",
            "--device",
            "cpu",
            "--input",
            "x=pixels",
            "--trust-remote-code",
        ],
        capsys,
    )
    assert code == 0
    assert "a note" in stderr
    assert seen == {
        "teacher_path": Path("t.onnx"),
        "temperature": 1.5,
        "out": Path("t.calibrated.onnx"),
        "overwrite": True,
        "device": "cpu",
        "output": "logits",
        "arch": "m:f",
        "arch_kwargs": "{}",
        "head": "fc",
        "input_map": {"x": "pixels"},
        "trust_remote_code": True,
    }


def test_cli_bad_inputs_exit_1_with_one_line(tmp_path, files, capsys):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "exists.onnx").write_bytes(b"x")
    import pickle

    with open(tmp_path / "pickled.pt", "wb") as fh:
        pickle.dump([1, 2], fh)
    cases = [
        [str(files["onnx"]), "-t", "0"],
        [str(files["onnx"]), "-t", "nan"],
        [str(files["onnx"]), "-t", "-2"],
        [str(files["onnx"]), "-t", "2", "--out", str(tmp_path / "exists.onnx")],
        [str(tmp_path / "random.onnx"), "-t", "2"],
        [str(tmp_path / "pickled.pt"), "-t", "2"],
        [str(files["safetensors"]), "-t", "2", "--arch", "nowhere.mod:f"],
        [str(files["safetensors"]), "-t", "2", "--arch", f"{fx.FIXTURES_FILE}:tiny_conv"],
        [str(files["safetensors"]), "-t", "2", "--arch", ARCH, "--head", "nope"],
    ]
    before = listing(tmp_path)
    for argv in cases:
        code, stdout, stderr = cli(["bake", *argv, "--device", "cpu"], capsys)
        assert code == 1, argv
        assert stdout == "", argv
        assert stderr.startswith("Error ("), (argv, stderr)
        assert stderr.count("\n") == 1, (argv, stderr)
        assert "Traceback" not in stderr
    assert listing(tmp_path) == before
    assert not any(p.name.startswith(".") for p in files["onnx"].parent.iterdir())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_bake(tmp_path, files, fmt):
    src, out = files[fmt], tmp_path / f"b{files[fmt].suffix}"
    result = bake_temperature(src, T, out, device="cuda", arch=arch_for(fmt))
    assert result.max_abs_error <= result.tolerance <= 1e-4
    baked = load_teacher(out, device="cuda", arch=arch_for(fmt))
    x = fx.inputs(5)
    with torch.no_grad():
        expected = fx.tiny_net()(x) / T
    torch.testing.assert_close(baked.logits(x.cuda()).cpu(), expected, atol=1e-4, rtol=0)
