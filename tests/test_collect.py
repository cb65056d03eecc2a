"""Logit collection: the streaming loop, its checks, and agreement with a direct module call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibrate_teacher.collect import LogitBatch, collect_logits, iter_logits
from calibrate_teacher.data import ArraySource, open_data
from calibrate_teacher.data.preprocess import PreprocessConfig
from calibrate_teacher.data.transform import preprocess_image
from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError
from calibrate_teacher.logits import LogitSet
from calibrate_teacher.teachers.base import InputSpec, Teacher

CONFIG = PreprocessConfig(input_size=(3, 8, 8), crop_pct=0.875, mean=(0.5,), std=(0.25,))


class ModuleTeacher:
    """A minimal Teacher: a torch module and the protocol's attributes."""

    format = "torchscript"
    input_names = None  # one unnamed tensor
    notes = ()

    def __init__(self, module, path, *, num_classes=4, input_spec=None, device="cpu"):
        self.module = module.to(device).eval()
        self.path = Path(path)
        self.num_classes = num_classes
        self.input_spec = input_spec
        self.device = device
        self.calls: list[torch.Tensor] = []

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(batch)
        return self.module(batch.to(self.device))


def make_module(in_features: int, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("ant", "bee", "cow", "dog")):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(3 + c):
            pixels = rng.integers(0, 256, size=(9 + i, 11, 3), dtype=np.uint8)
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(pixels).save(tmp_path / "val" / cls / f"{i}{suffix}")
    return tmp_path / "val"


@pytest.fixture
def teacher(tmp_path) -> ModuleTeacher:
    spec = InputSpec(name="x", shape=(None, 3, 8, 8), dtype="float32")
    return ModuleTeacher(make_module(3 * 8 * 8), tmp_path / "t.pt", input_spec=spec)


def test_module_teacher_satisfies_the_protocol(teacher):
    assert isinstance(teacher, Teacher)


def test_collect_matches_preprocessing_plus_module(folder, teacher):
    source = open_data(folder, preprocess=CONFIG, teacher=teacher)
    logit_set = collect_logits(teacher, source, batch_size=4)
    keys = sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*.*"))
    # Independent reference: decode each file, preprocess, one module call on the whole stack.
    reference = []
    for key in keys:
        with Image.open(folder / key) as image:
            reference.append(preprocess_image(image, CONFIG))
    with torch.no_grad():
        expected = teacher.module(torch.stack(reference))
    assert isinstance(logit_set, LogitSet)
    assert logit_set.keys == tuple(keys)
    classes = ("ant", "bee", "cow", "dog")
    assert logit_set.labels.tolist() == [classes.index(k.split("/")[0]) for k in keys]
    assert logit_set.logits.dtype == torch.float32
    torch.testing.assert_close(logit_set.logits, expected, atol=1e-5, rtol=0)
    assert [len(c) for c in teacher.calls] == [4, 4, 4, 4, 2]


def test_worker_count_does_not_change_the_result(folder, teacher):
    source = open_data(folder, preprocess=CONFIG, teacher=teacher)
    base = collect_logits(teacher, source, batch_size=5, workers=0)
    for workers in (1, 2):
        other = collect_logits(teacher, source, batch_size=5, workers=workers)
        assert other.keys == base.keys
        assert torch.equal(other.labels, base.labels)
        torch.testing.assert_close(other.logits, base.logits, atol=0, rtol=0)


def test_iter_logits_streams_batch_by_batch(folder, teacher):
    source = open_data(folder, preprocess=CONFIG, teacher=teacher)
    stream = iter_logits(teacher, source, batch_size=3)
    first = next(stream)
    assert isinstance(first, LogitBatch)
    assert len(teacher.calls) == 1  # nothing beyond the first batch has been run
    assert first.indices.tolist() == [0, 1, 2]
    assert first.logits.shape == (3, 4)
    rest = list(stream)
    assert sum(len(b.keys) for b in rest) == len(source) - 3


def test_iter_logits_indices_and_progress(folder, teacher):
    source = open_data(folder, preprocess=CONFIG, teacher=teacher)
    full = collect_logits(teacher, source)
    done: list[int] = []
    order = [11, 2, 7, 3]
    batches = list(iter_logits(teacher, source, batch_size=3, indices=order, progress=done.append))
    assert done == [3, 1]
    got = torch.cat([b.logits for b in batches])
    # Other batch compositions take other BLAS paths: equal up to float rounding.
    torch.testing.assert_close(got, full.logits[order], atol=1e-6, rtol=0)
    assert [k for b in batches for k in b.keys] == [full.keys[i] for i in order]


def test_skipped_samples_count_towards_progress(folder, teacher):
    (folder / "bee" / "0.png").write_bytes(b"broken")
    source = open_data(folder, preprocess=CONFIG, teacher=teacher, skip_bad=True)
    done: list[int] = []
    logit_set = collect_logits(teacher, source, batch_size=4, progress=done.append)
    assert sum(done) == len(source) == logit_set.num_samples + 1
    assert "bee/0.png" not in logit_set.keys
    assert [k for k, _ in source.skipped] == ["bee/0.png"]


def test_every_sample_skipped_is_an_input_error(tmp_path, teacher):
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "x.png").write_bytes(b"broken")
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    with pytest.raises(InputError, match=r"no sample could be read"):
        collect_logits(teacher, source)


def test_nan_logits_name_the_teacher_and_the_sample(tmp_path, teacher):
    inputs = torch.zeros(10, 3, 8, 8)
    inputs[6, 0, 0, 0] = float("nan")  # the linear teacher turns it into a NaN row
    source = ArraySource.from_tensors(inputs, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(
        TeacherError, match=r"t.pt: returned NaN or Inf logits for sample 6 \(1 of 4"
    ):
        collect_logits(teacher, source, batch_size=4)


def test_inf_logits_are_refused(tmp_path):
    class Inf(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("inf"))

    teacher = ModuleTeacher(Inf(), tmp_path / "inf.onnx")
    source = ArraySource.from_tensors(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TeacherError, match=r"inf.onnx: returned NaN or Inf logits for sample 0"):
        collect_logits(teacher, source)


def test_huge_finite_logits_are_not_mistaken_for_inf(tmp_path):
    class Huge(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[3e38, 3e38, 0.0, 0.0]]).expand(x.shape[0], 4)

    teacher = ModuleTeacher(Huge(), tmp_path / "huge.pt")
    source = ArraySource.from_tensors(torch.zeros(3, 1), torch.zeros(3, dtype=torch.int64))
    (batch,) = iter_logits(teacher, source)  # the row sums overflow; every logit is finite
    assert batch.logits[:, 0].tolist() == [pytest.approx(3e38, rel=1e-6)] * 3


def test_wrong_logit_shape_is_a_teacher_error(tmp_path):
    teacher = ModuleTeacher(make_module(4, num_classes=3), tmp_path / "t.pt", num_classes=4)
    source = ArraySource.from_tensors(torch.zeros(5, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TeacherError, match=r"shape \(2, 3\) for a batch of 2; expected \[2, 4\]"):
        collect_logits(teacher, source, batch_size=2)


def test_unlabelled_samples_cannot_be_calibrated(tmp_path, teacher):
    source = ArraySource.from_tensors(torch.zeros(3, 3, 8, 8), torch.tensor([0, -1, 2]))
    with pytest.raises(InvalidValueError, match=r"labels must lie in"):
        collect_logits(teacher, source)
    batches = list(iter_logits(teacher, source))  # streaming consumers still get them
    assert batches[0].labels.tolist() == [0, -1, 2]


def test_half_precision_teacher_gives_float32_logits(tmp_path):
    teacher = ModuleTeacher(make_module(6).half(), tmp_path / "h.pt")
    source = ArraySource.from_tensors(torch.ones(4, 6).half(), torch.zeros(4, dtype=torch.int64))
    logit_set = collect_logits(teacher, source)
    assert logit_set.logits.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.gpu
def test_cuda_teacher_gets_pinned_batches_and_same_logits(folder, tmp_path):
    module = make_module(3 * 8 * 8)
    cpu = ModuleTeacher(module, tmp_path / "t.pt")
    cuda = ModuleTeacher(make_module(3 * 8 * 8), tmp_path / "t.pt", device="cuda")
    source = open_data(folder, preprocess=CONFIG)
    for workers in (0, 2):
        got = collect_logits(cuda, source, batch_size=4, workers=workers)
        assert all(batch.is_pinned() for batch in cuda.calls)
        cuda.calls.clear()
        torch.testing.assert_close(
            got.logits, collect_logits(cpu, source).logits, atol=1e-5, rtol=0
        )
        assert got.logits.device.type == "cpu"


# --- every teacher format, loaded by load_teacher ---------------------------------------------

ARCH_SOURCE = '''
import torch


class SmallConv(torch.nn.Module):
    """Conv -> ReLU -> global average pool -> Linear: any image size runs."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def small_conv(num_classes: int = 5):
    torch.manual_seed(0)
    return SmallConv(num_classes).eval()
'''


def _onnx_small_conv(module, path: Path) -> Path:
    # Written with onnx.helper: no exporter, no onnxscript, no exporter warnings.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name, tensor):
        return numpy_helper.from_array(tensor.detach().numpy(), name)

    weights = [
        init("conv.weight", module.conv.weight),
        init("conv.bias", module.conv.bias),
        init("fc.weight", module.fc.weight),
        init("fc.bias", module.fc.bias),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def teacher_files(tmp_path):
    import importlib.util
    import json
    import warnings

    from safetensors.torch import save_file

    (tmp_path / "arch.py").write_text(ARCH_SOURCE)
    spec = importlib.util.spec_from_file_location("_collect_arch", tmp_path / "arch.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    module = arch.small_conv()
    models = tmp_path / "models"
    models.mkdir()
    files = {"onnx": (_onnx_small_conv(module, models / "teacher.onnx"), {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.script(module).save(str(models / "teacher.pt"))
    files["torchscript"] = (models / "teacher.pt", {})
    weights = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(weights, str(models / "teacher.safetensors"))
    arch_ref = f"{tmp_path / 'arch.py'}:small_conv"
    files["safetensors"] = (models / "teacher.safetensors", {"arch": arch_ref})
    program = torch.export.export(
        module, (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    torch.export.save(program, str(models / "teacher.pt2"))
    files["export"] = (models / "teacher.pt2", {})
    sidecar = {
        "input_size": [3, 8, 8],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
    }
    (models / "teacher.preprocess.json").write_text(json.dumps(sidecar))
    return module, files, PreprocessConfig.from_dict(sidecar, source="test")


@pytest.mark.parametrize(
    ("fmt", "workers"),
    [("onnx", 0), ("torchscript", 0), ("safetensors", 0), ("export", 0), ("onnx", 2)],
)
def test_every_format_matches_preprocessing_plus_module(folder, teacher_files, fmt, workers):
    from calibrate_teacher.teachers import load_teacher

    module, files, config = teacher_files
    path, kwargs = files[fmt]
    teacher = load_teacher(path, device="cpu", **kwargs)
    assert teacher.format == fmt
    assert teacher.num_classes == 5
    from calibrate_teacher.teachers import find_model_preprocessing

    layers = find_model_preprocessing(path)
    source = open_data(folder, teacher=teacher, model_layers=layers, classes=["ant", "bee", "cow", "dog", "eel"])
    assert source.config == config  # the sidecar beside every format
    logit_set = collect_logits(teacher, source, batch_size=4, workers=workers)
    keys = sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*.*"))
    assert logit_set.keys == tuple(keys)
    reference = []
    for key in keys:
        with Image.open(folder / key) as image:
            reference.append(preprocess_image(image, config))
    with torch.no_grad():
        expected = module(torch.stack(reference))
    torch.testing.assert_close(logit_set.logits, expected, atol=1e-5, rtol=0)
