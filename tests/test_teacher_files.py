"""Teacher files as they come (#10): static-batch programs, files read by content, proven heads."""

from __future__ import annotations

import textwrap

import _teacher_fixtures as fx
import numpy as np
import pytest
import torch
from torch.export import Dim
from torch.utils.data import DataLoader, TensorDataset

import calibrate_teacher as ct
from calibrate_teacher.baking import bake_temperature, default_baked_path
from calibrate_teacher.errors import BakeError, InputError, TeacherError
from calibrate_teacher.teachers import _export as export_backend
from calibrate_teacher.teachers import _safetensors as safetensors_backend
from calibrate_teacher.teachers import load_teacher
from calibrate_teacher.teachers._files import detect_format

T = 2.5


def one_line(exc_info):
    text = str(exc_info.value)
    assert text
    assert "\n" not in text
    return text


def rows(n, *shape):
    return torch.from_numpy(np.random.default_rng(0).standard_normal((n, *shape))).float()


def listing(d):
    return sorted(p.name for p in d.iterdir())


def save_program(module, path, sample, dynamic_shapes=None):
    torch.export.save(torch.export.export(module, (sample,), dynamic_shapes=dynamic_shapes), str(path))
    return path


# --- 3. static-shape programs: chunks of the fixed batch, padded, padding dropped ----------------


def test_static_batch_pt2_fits_and_bakes_on_an_odd_number_of_samples(tmp_path):
    conv = fx.tiny_conv()
    static = save_program(conv, tmp_path / "static.pt2", torch.zeros(2, 3, 8, 8))  # the default way
    dynamic = save_program(conv, tmp_path / "dynamic.pt2", torch.zeros(2, 3, 8, 8), ({0: Dim.AUTO},))
    x = rows(7, 3, 8, 8)
    with torch.no_grad():
        labels = conv(x).argmax(1)
    labels[:2] = (labels[:2] + 1) % fx.CLASSES  # a little miscalibration to fit
    loader = DataLoader(TensorDataset(x, labels), batch_size=3)  # 3 + 3 + 1 rows on a batch of 2

    run = ct.calibrate(static, data=loader, out=tmp_path / "static.calibrated.pt2")
    reference = ct.calibrate(dynamic, data=loader, bake=False)
    torch.testing.assert_close(run.source.logits.logits, reference.source.logits.logits, atol=1e-5, rtol=0)
    assert any("fixed at 2" in note for note in run.notes)

    temperature = run.fit.temperature
    assert run.baked is not None
    assert run.baked.max_abs_error <= run.baked.tolerance
    original, baked = load_teacher(static, device="cpu"), load_teacher(run.baked.path, device="cpu")
    assert baked.batch_rows == original.batch_rows == (2, 2)  # still a valid static program
    for n in (1, 2, 5, 7):
        torch.testing.assert_close(baked.logits(x[:n]), original.logits(x[:n]) / temperature, atol=1e-5, rtol=0)
    program = torch.export.load(str(run.baked.path)).module()
    with torch.no_grad():  # the baked file itself runs at its batch size, as the original did
        torch.testing.assert_close(program(x[:2]), conv(x[:2]) / temperature, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_batch_programs_run_any_batch_size(tmp_path, batch):
    net = fx.tiny_net()
    teacher = load_teacher(save_program(net, tmp_path / "s.pt2", fx.inputs(batch)), device="cpu")
    assert teacher.batch_rows == (batch, batch)
    assert teacher.input_spec.shape == (batch, fx.IN_FEATURES)
    for n in (0, 1, 2, 4, 7):
        x = fx.inputs(n) if n else torch.zeros(0, fx.IN_FEATURES)
        with torch.no_grad():
            torch.testing.assert_close(teacher.logits(x), net(x), atol=1e-6, rtol=0)


def test_bounded_dynamic_batch_runs_outside_its_bounds_and_bakes_with_them(tmp_path):
    net = fx.tiny_net(softmax=True)
    path = save_program(net, tmp_path / "b.pt2", fx.inputs(4), ({0: Dim("batch", min=3, max=5)},))
    teacher = load_teacher(path, device="cpu")
    assert teacher.batch_rows == (3, 5)
    with torch.no_grad():
        logits = net.head(net.act(net.body(fx.inputs(11))))
    for n in (1, 11):
        torch.testing.assert_close(teacher.logits(fx.inputs(n)), logits[:n], atol=1e-6, rtol=0)
    result = bake_temperature(path, T, tmp_path / "b.calibrated.pt2", device="cpu")
    assert result.checked_probabilities
    baked = load_teacher(result.path, device="cpu")
    assert baked.batch_rows == (3, 5)  # the bounds survive the re-export
    torch.testing.assert_close(baked.logits(fx.inputs(11)), logits / T, atol=1e-5, rtol=0)


def test_static_program_refuses_other_non_batch_sizes_in_one_line(tmp_path):
    path = save_program(fx.tiny_conv(), tmp_path / "s.pt2", torch.zeros(2, 3, 8, 8))
    teacher = load_teacher(path, device="cpu")
    with pytest.raises(TeacherError) as exc:
        teacher.logits(torch.zeros(5, 3, 16, 8))
    text = one_line(exc)
    assert "(N, 3, 8, 8), got (5, 3, 16, 8)" in text
    assert 'dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO}}' in text
    with pytest.raises(TeacherError) as exc:
        teacher.logits(torch.zeros(5, 3, 8))
    assert "got (5, 3, 8)" in one_line(exc)


def test_guard_failures_of_a_bounded_dimension_are_one_line(tmp_path):
    shapes = ({0: Dim.AUTO, 2: Dim("h", min=4, max=16), 3: Dim("w", min=4, max=16)},)
    path = save_program(fx.tiny_conv(), tmp_path / "hw.pt2", torch.zeros(2, 3, 8, 8), shapes)
    teacher = load_teacher(path, device="cpu")
    assert teacher.logits(torch.zeros(3, 3, 12, 12)).shape == (3, fx.CLASSES)
    with pytest.raises(TeacherError) as exc:
        teacher.logits(torch.zeros(3, 3, 32, 32))
    text = one_line(exc)
    assert "does not run on inputs of shape (3, 3, 32, 32)" in text
    assert 'dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO}}' in text


@pytest.mark.gpu
def test_static_batch_pt2_on_cuda(tmp_path):
    conv = fx.tiny_conv()
    path = save_program(conv, tmp_path / "s.pt2", torch.zeros(2, 3, 8, 8))
    teacher = load_teacher(path, device="cuda")
    x = rows(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x.cuda()).cpu(), conv(x), atol=1e-4, rtol=0)
    result = bake_temperature(path, T, tmp_path / "b.pt2", device="cuda")
    assert result.max_abs_error <= result.tolerance


def fixed_batch_onnx(net, batch):
    model = fx.onnx_model(net)
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return model


def test_fixed_batch_onnx_runs_in_chunks_and_bakes(tmp_path):
    import onnx

    net = fx.tiny_net()
    path = fx.save_onnx(fixed_batch_onnx(net, 3), tmp_path / "fixed.onnx")
    teacher = load_teacher(path, device="cpu")
    assert teacher.batch_rows == (3, 3)
    assert "fixed at 3" in teacher.notes[0]
    x = fx.inputs(7)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(teacher.logits(x), expected, atol=1e-5, rtol=0)
    result = bake_temperature(path, T, tmp_path / "fixed.calibrated.onnx", device="cpu")
    baked_model = onnx.load(str(result.path))
    assert baked_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    torch.testing.assert_close(load_teacher(result.path, device="cpu").logits(x), expected / T, atol=1e-5, rtol=0)
    with pytest.raises(TeacherError) as exc:
        teacher.logits(torch.zeros(3, fx.IN_FEATURES + 1))
    assert "dimension(s) 1 dynamic" in one_line(exc)


# --- 4. files read by what they hold --------------------------------------------------------


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    """The tiny net under suffixes that name no format: name -> (path, format, needs --arch)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("generic")
    net = fx.tiny_net()
    torch.save(net.state_dict(), d / "pytorch_model.bin")
    torch.save(net.state_dict(), d / "legacy.model", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "weights.bin"))
    return {
        "state dict": (d / "pytorch_model.bin", "state_dict", True),
        "legacy pickle": (d / "legacy.model", "state_dict", True),
        "safetensors": (d / "weights.bin", "safetensors", True),
        "torchscript": (fx.save_torchscript(net, d / "model.ts"), "torchscript", False),
        "onnx": (fx.save_onnx(fx.onnx_model(net), d / "model.bin"), "onnx", False),
        "export": (fx.save_export(net, d / "program", fx.inputs(3)), "export", False),
    }


@pytest.mark.parametrize(
    "kind", ["state dict", "legacy pickle", "safetensors", "torchscript", "onnx", "export"]
)
def test_generic_suffixes_are_read_by_content_and_baked_as_they_are(tmp_path, generic, kind):
    path, fmt, needs_arch = generic[kind]
    arch = fx.ARCH if needs_arch else None
    assert detect_format(path, arch=arch) == fmt
    teacher = load_teacher(path, device="cpu", arch=arch)
    assert teacher.format == fmt
    assert "read by its content" in teacher.notes[0]
    x = fx.inputs(5)
    with torch.no_grad():
        expected = fx.tiny_net()(x)
    torch.testing.assert_close(teacher.logits(x), expected, atol=1e-5, rtol=0)

    # The baked copy keeps the suffix (none stays none) and is read back by content too.
    out = tmp_path / (default_baked_path(path).name if path.suffix else "program-calibrated")
    result = bake_temperature(path, T, out, device="cpu", arch=arch)
    assert (result.path.suffix, result.format) == (path.suffix, fmt)
    assert detect_format(out, arch=arch) == fmt
    baked = load_teacher(out, device="cpu", arch=arch)
    torch.testing.assert_close(baked.logits(x), expected / T, atol=1e-5, rtol=0)
    assert result.head == {"state_dict": "head", "safetensors": "head", "onnx": "logits"}.get(fmt)


def test_generic_state_dict_needs_arch_and_is_never_unpickled(tmp_path, generic):
    with pytest.raises(InputError) as exc:
        load_teacher(generic["state dict"][0], device="cpu")
    assert "--arch" in one_line(exc)
    assert "never unpickled" in one_line(exc)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")  # a pickled nn.Module
    with pytest.raises(TeacherError) as exc:
        load_teacher(tmp_path / "module.bin", device="cpu", arch=fx.ARCH)
    assert "weights_only" in one_line(exc)


def test_export_found_by_content_still_goes_through_the_audit(generic, monkeypatch):
    seen = []

    def refuse(path):
        seen.append(path)
        raise TeacherError(f"{path}: refused by the audit")

    monkeypatch.setattr(export_backend, "audit_archive", refuse)
    path = generic["export"][0]
    with pytest.raises(TeacherError, match="refused by the audit"):
        load_teacher(path, device="cpu")
    assert seen == [path]


def test_unknown_content_under_a_generic_suffix_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise.bin").write_bytes(rng.bytes(4096))
    (tmp_path / "fake_onnx.bin").write_bytes(b"\x08" + rng.bytes(4095))  # ONNX's first byte only
    (tmp_path / "keras.model").write_bytes(b"\x89HDF\r\n\x1a\n" + rng.bytes(64))
    for name in ("noise.bin", "fake_onnx.bin", "keras.model"):
        with pytest.raises(InputError) as exc:
            load_teacher(tmp_path / name, device="cpu")
        assert "names no format we read" in one_line(exc), name


def test_a_suffix_that_names_another_format_is_refused_with_the_rename(tmp_path, generic):
    def copy(kind, name):
        target = tmp_path / name
        target.write_bytes(generic[kind][0].read_bytes())
        return target

    cases = [
        (copy("torchscript", "model.onnx"), "named .onnx but holds a TorchScript archive; rename it to model.pt"),
        (copy("onnx", "w.safetensors"), "named .safetensors but holds an ONNX model; rename it to w.onnx"),
        (copy("torchscript", "p.pt2"), "named .pt2 but holds a TorchScript archive; rename it to p.pt"),
        (copy("onnx", "m.pt"), "named .pt but holds an ONNX model; rename it to m.onnx"),
        (copy("export", "e.pth"), "named .pth but holds a torch.export program; rename it to e.pt2"),
        (copy("safetensors", "s.pth"), "holds safetensors weights; rename it to s.safetensors (and pass --arch)"),
        (copy("state dict", "sd.onnx"), "holds a torch.save checkpoint; rename it to sd.pth (and pass --arch)"),
    ]
    before = listing(tmp_path)
    for path, fragment in cases:
        with pytest.raises(InputError) as exc:
            load_teacher(path, device="cpu", arch=fx.ARCH)
        assert fragment in one_line(exc), path
        with pytest.raises(InputError):
            bake_temperature(path, T, tmp_path / f"out{path.suffix}", device="cpu", arch=fx.ARCH)
    assert listing(tmp_path) == before


# --- 5. the head is proven by the probe ----------------------------------------------------

HEADS = textwrap.dedent(
    """
    import torch

    IN, HIDDEN, CLASSES = 6, 16, 5


    class Net(torch.nn.Module):
        def __init__(self, ending):
            super().__init__()
            self.ending = ending
            self.body = torch.nn.Linear(IN, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)
            self.gate = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            h = torch.relu(self.body(x))
            if self.ending == "scaled":  # linear in the head: W/T still gives original / T
                return self.head(h) * 3.0
            if self.ending == "gated":  # the last Linear (gate) cannot fold; head can
                return self.head(h) * torch.sigmoid(self.gate(h))
            return torch.tanh(self.head(h))  # nothing folds


    def net(ending="scaled"):
        torch.manual_seed(0)
        return Net(ending).eval()
    """
)


@pytest.fixture
def heads(tmp_path):
    source = tmp_path / "heads.py"
    source.write_text(HEADS)
    return f"{source}:net"


def save_heads(arch, path, ending):
    from calibrate_teacher.teachers._arch import build_model

    net = build_model(arch, {"ending": ending})
    if path.suffix == ".safetensors":
        fx.save_safetensors(net, path)
    else:
        torch.save(net.state_dict(), path)
    return net, path


@pytest.mark.parametrize(("ending", "name"), [("scaled", "head.safetensors"), ("gated", "pytorch_model.bin")])
def test_head_found_by_proof_without_head_option(tmp_path, heads, ending, name):
    net, path = save_heads(heads, tmp_path / name, ending)
    result = bake_temperature(
        path, T, tmp_path / f"baked{path.suffix}", device="cpu", arch=heads, arch_kwargs={"ending": ending}
    )
    assert result.head == "head"
    assert result.max_abs_error <= result.tolerance
    baked = load_teacher(result.path, device="cpu", arch=heads, arch_kwargs={"ending": ending})
    x = fx.inputs(9)
    with torch.no_grad():
        torch.testing.assert_close(baked.logits(x), net(x) / T, atol=1e-5, rtol=0)
    state = baked._fn.state_dict()
    for key, value in net.state_dict().items():  # only the head changed
        expected = (value.double() / T).float() if key.startswith("head.") else value
        assert torch.equal(state[key], expected), key


def test_no_provable_head_is_one_line_naming_the_candidates(tmp_path, heads):
    _, path = save_heads(heads, tmp_path / "tanh.safetensors", "tanh")
    kwargs = {"device": "cpu", "arch": heads, "arch_kwargs": {"ending": "tanh"}}
    before = listing(tmp_path)
    with pytest.raises(BakeError) as exc:
        bake_temperature(path, T, tmp_path / "b.safetensors", **kwargs)
    text = one_line(exc)
    assert "tried head (" in text
    assert "body (" in text
    assert "--head" in text
    with pytest.raises(BakeError) as exc:  # a named head gets the same proof
        bake_temperature(path, T, tmp_path / "b.safetensors", head="head", **kwargs)
    assert "max |baked - original/T|" in one_line(exc)
    assert listing(tmp_path) == before


def test_explicit_head_is_proven_and_used(tmp_path, heads):
    _, path = save_heads(heads, tmp_path / "g.safetensors", "gated")
    kwargs = {"device": "cpu", "arch": heads, "arch_kwargs": {"ending": "gated"}}
    result = bake_temperature(path, T, tmp_path / "b.safetensors", head="head", **kwargs)
    assert result.head == "head"
    with pytest.raises(BakeError) as exc:
        bake_temperature(path, T, tmp_path / "c.safetensors", head="gate", **kwargs)
    assert "--head 'gate'" in one_line(exc)
    # The proof folds in memory and restores bit for bit: the teacher is unchanged afterwards.
    teacher = load_teacher(path, **kwargs)
    x = fx.inputs(4)
    before = teacher.logits(x)
    with pytest.raises(BakeError):
        safetensors_backend.bake(teacher, T, tmp_path / "d.safetensors", head="gate")
    assert torch.equal(teacher.logits(x), before)
    assert not (tmp_path / "d.safetensors").exists()
