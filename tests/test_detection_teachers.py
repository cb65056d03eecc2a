"""Detection teachers (#14): logits read from ONNX graphs and PyTorch state dicts vs the torch model."""

import _detection_fixtures as dfx
import numpy as np
import onnx
import pytest
import torch
from _detection_fixtures import CLASS_NAMES, NUM_CLASSES, SIZE

from calibrate_teacher.detection._onnx import parse_imgsz, parse_names
from calibrate_teacher.detection.base import DetectionTeacher
from calibrate_teacher.detection.load import is_detection_onnx, load_detection_teacher
from calibrate_teacher.errors import InvalidValueError, TeacherError


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return dfx.shared(tmp_path_factory.getbasetemp())


def close(a, b, rel=1e-5):
    """|a - b| <= rel * max(1, max |b|), in float64."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    bound = rel * max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= bound, (err, bound)
    return err


def reference(fx, rows=slice(0, 5)):
    with torch.no_grad():
        return fx.dense.raw(fx.images[rows])


def test_ultralytics_logits_are_the_pre_sigmoid_class_rows(fx):
    teacher = load_detection_teacher(fx.onnx, device="cpu")
    assert isinstance(teacher, DetectionTeacher)
    assert (teacher.layout, teacher.head, teacher.background) == ("ultralytics", "sigmoid", "none")
    assert teacher.class_names == CLASS_NAMES and teacher.num_classes == NUM_CLASSES
    assert teacher.image_size == (SIZE, SIZE) and teacher.device == "cpu"
    assert any("fixed at 1" in n for n in teacher.notes)  # ultralytics' static batch runs in chunks
    ref = reference(fx)
    found = teacher.detect(fx.images[:5])
    assert len(found) == 5
    for i, d in enumerate(found):
        assert d.logits.shape == (64, NUM_CLASSES) and d.objectness is None and not d.nms_applied
        close(d.logits, ref["logits"][i].T)
        close(d.boxes, ref["xyxy"][i])
    # the logits really are pre-sigmoid: the graph's own output is their sigmoid
    import onnxruntime as ort

    (scores,) = ort.InferenceSession(str(fx.onnx)).run(["output0"], {"images": fx.images[:1].numpy()})
    assert np.abs(torch.sigmoid(found[0].logits.double()).numpy().T - scores[0, 4:]).max() < 1e-6


def test_yolox_layout_gives_objectness_and_class_logits(fx):
    teacher = load_detection_teacher(fx.yolox_onnx, device="cpu")
    assert teacher.layout == "yolox" and teacher.reading.objectness and teacher.class_names is None
    assert teacher.num_classes == NUM_CLASSES and len(teacher.reading.sigmoids) == 2
    ref = reference(fx)
    for i, d in enumerate(teacher.detect(fx.images[:5])):
        close(d.logits, ref["logits"][i].T)
        close(d.objectness, ref["objectness"][i])
        close(d.boxes, ref["xyxy"][i])


def test_named_outputs_sigmoid(fx):
    teacher = load_detection_teacher(fx.generic_onnx, boxes_output="boxes", scores_output="scores", device="cpu")
    assert (teacher.layout, teacher.head, teacher.num_classes) == ("named", "sigmoid", NUM_CLASSES)
    ref = reference(fx)
    for i, d in enumerate(teacher.detect(fx.images[:5])):
        close(d.logits, ref["logits"][i].T)
        close(d.boxes, ref["xyxy"][i])


def test_scores_without_a_visible_sigmoid_are_refused(fx):
    with pytest.raises(TeacherError, match="no visible Sigmoid or Softmax"):
        load_detection_teacher(fx.generic_raw_onnx, boxes_output="boxes", scores_output="scores", device="cpu")
    with pytest.raises(TeacherError, match="--boxes-output"):
        load_detection_teacher(fx.generic_onnx, device="cpu")  # two outputs, none named


def test_head_and_output_options_are_checked(fx):
    with pytest.raises(InvalidValueError, match="sigmoid head"):
        load_detection_teacher(fx.onnx, head="softmax", device="cpu")
    with pytest.raises(InvalidValueError, match="both"):
        load_detection_teacher(fx.generic_onnx, boxes_output="boxes", device="cpu")
    with pytest.raises(TeacherError, match="not an output"):
        load_detection_teacher(fx.generic_onnx, boxes_output="boxes", scores_output="nope", device="cpu")
    with pytest.raises(InvalidValueError, match="head"):
        load_detection_teacher(fx.onnx, head="softplus", device="cpu")


def test_softmax_named_output_needs_background(tmp_path, fx):
    model = onnx.load(str(fx.generic_raw_onnx))
    graph = model.graph
    # scores = Softmax(Concat(zeros, logits)) over the last axis: background first
    producer = next(n for n in graph.node if n.output[0] == "scores")
    transposed = producer.input[0]
    producer.output[0] = "logits_bnc"
    assert transposed
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    graph.node.extend(
        [
            onnx.helper.make_node("Mul", ["logits_bnc", "zero"], ["zeros"], name="m"),
            onnx.helper.make_node("ReduceMax", ["zeros"], ["bg"], name="r", axes=[-1], keepdims=1),  # [B, N, 1]
            onnx.helper.make_node("Concat", ["bg", "logits_bnc"], ["z"], name="c", axis=-1),
            onnx.helper.make_node("Softmax", ["z"], ["scores"], name="softmax", axis=-1),
        ]
    )
    graph.output[1].type.tensor_type.shape.dim[2].dim_value = NUM_CLASSES + 1
    path = tmp_path / "softmax.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidValueError, match="background='first'"):
        load_detection_teacher(path, boxes_output="boxes", scores_output="scores", device="cpu")
    teacher = load_detection_teacher(
        path, boxes_output="boxes", scores_output="scores", background="first", device="cpu"
    )
    assert (teacher.head, teacher.num_classes) == ("softmax", NUM_CLASSES)
    ref = reference(fx)
    for i, d in enumerate(teacher.detect(fx.images[:5])):
        close(d.logits[:, 1:], ref["logits"][i].T)
        assert torch.equal(d.logits[:, 0], torch.zeros(64))


def test_is_detection_onnx(fx):
    assert is_detection_onnx(fx.onnx) and is_detection_onnx(fx.yolox_onnx)
    assert not is_detection_onnx(fx.generic_raw_onnx)


def test_names_metadata_is_parsed_safely():
    assert parse_names("{0: 'person', 1: 'bicycle'}") == ("person", "bicycle")
    assert parse_names("['a', 'b']") == ("a", "b")
    assert parse_names("{'1': 'b', '0': 'a'}") == ("a", "b")
    for bad in ("__import__('os').system('true')", "{0: 'a', 2: 'b'}", "{True: 'a'}", "{0: 1}", "{'a': 'b'}", "x" * 10):
        assert parse_names(bad) is None
    assert parse_imgsz("[384, 640]") == (384, 640) and parse_imgsz("640") == (640, 640)
    assert parse_imgsz("os.system") is None


@pytest.mark.parametrize(
    ("weights", "kwargs", "layer", "head", "background"),
    [
        ("dense_weights", {}, "head.classification_head.cls_logits", "sigmoid", "none"),
        ("two_stage_weights", {}, "roi_heads.box_predictor.cls_score", "softmax", "first"),
        (
            "two_stage_d2_weights",
            {"arch_kwargs": {"layout": "detectron2"}},
            "roi_heads.box_predictor.cls_score",
            "softmax",
            "last",
        ),
    ],
)
def test_state_dict_detectors(fx, weights, kwargs, layer, head, background):
    arch = fx.dense_arch if weights == "dense_weights" else fx.two_stage_arch
    teacher = load_detection_teacher(getattr(fx, weights), arch=arch, device="cpu", **kwargs)
    assert isinstance(teacher, DetectionTeacher)
    assert (teacher.format, teacher.class_layer, teacher.head, teacher.background) == (
        "safetensors",
        layer,
        head,
        background,
    )
    assert teacher.num_classes == NUM_CLASSES
    model = {"dense_weights": fx.dense, "two_stage_weights": fx.two_stage, "two_stage_d2_weights": fx.two_stage_d2}[
        weights
    ]
    with torch.no_grad():
        expected = model(fx.images[:3])
    for d, e in zip(teacher.detect(fx.images[:3]), expected, strict=True):
        assert torch.equal(d.logits, e["logits"]) and torch.equal(d.boxes, e["boxes"])
    if background == "last":
        assert any("detectron2" in n for n in teacher.notes)


def test_detectron2_and_torchvision_layouts_agree(fx):
    tv = load_detection_teacher(fx.two_stage_weights, arch=fx.two_stage_arch, device="cpu")
    d2 = load_detection_teacher(
        fx.two_stage_d2_weights, arch=fx.two_stage_arch, arch_kwargs='{"layout": "detectron2"}', device="cpu"
    )
    from calibrate_teacher.detection.base import foreground_scores

    for a, b in zip(tv.detect(fx.images[:2]), d2.detect(fx.images[:2]), strict=True):
        assert torch.allclose(foreground_scores(a), foreground_scores(b), atol=1e-6)


def test_state_dict_needs_arch_and_the_forward_contract(tmp_path, fx):
    with pytest.raises(TeacherError, match="--arch"):
        load_detection_teacher(fx.dense_weights, device="cpu")
    factory = tmp_path / "bad.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(fx.dense_arch.rpartition(':')[0].rsplit('/', 1)[0])!r})\n"
        "import _detection_fixtures as fx\n"
        "class Raw(fx.TinyDense):\n"
        "    def forward(self, images):\n"
        "        return self.raw(images)['logits']\n"
        "def raw():\n"
        "    return Raw()\n"
    )
    with pytest.raises(TeacherError, match="forward contract"):
        load_detection_teacher(fx.dense_weights, arch=f"{factory}:raw", device="cpu")
    with pytest.raises(InvalidValueError, match="sigmoid head"):
        load_detection_teacher(fx.dense_weights, arch=fx.dense_arch, head="softmax", device="cpu")
    with pytest.raises(InvalidValueError, match="head="):
        load_detection_teacher(
            fx.dense_weights, arch=fx.dense_arch, class_layer="head.classification_head.cls_logits", device="cpu"
        )


class _UltralyticsHead(torch.nn.Module):
    """TinyDense with ultralytics' ``Detect._inference`` ending, for torch.onnx.export."""

    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def forward(self, x):
        d = self.dense
        feat = d.backbone(x)
        box, cls = d.head.regression_head.bbox_reg(feat), d.head.classification_head.cls_logits(feat)
        x_cat = torch.cat([box, cls], 1).view(x.shape[0], 4 + NUM_CLASSES, -1)
        reg, logits = x_cat.split((4, NUM_CLASSES), 1)
        ltrb = torch.nn.functional.softplus(reg) * dfx.STRIDE
        anchors = dfx.anchor_points()[None]
        x1y1, x2y2 = anchors - ltrb[:, :2], anchors + ltrb[:, 2:]
        dbox = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1)
        return torch.cat((dbox, logits.sigmoid()), 1)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_graphs_from_torch_onnx_export(tmp_path, fx, dynamo):
    """The exporters' own graphs (legacy: what ultralytics runs; dynamo: torch's default)."""
    import warnings

    path = tmp_path / "exported.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, dynamo's pytree notes
        torch.onnx.export(
            _UltralyticsHead(fx.dense).eval(),
            (fx.images[:1],),
            str(path),
            input_names=["images"],
            output_names=["output0"],
            opset_version=17,
            dynamo=dynamo,
        )
    teacher = load_detection_teacher(path, device="cpu")
    assert teacher.layout == "ultralytics" and teacher.class_names is None  # no metadata written
    ref = reference(fx)
    for i, d in enumerate(teacher.detect(fx.images[:5])):
        close(d.logits, ref["logits"][i].T)
        close(d.boxes, ref["xyxy"][i])
