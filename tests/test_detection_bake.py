"""Baked detectors (#14): T on the class logits only, boxes bit-identical, probe-verified."""

import _detection_fixtures as dfx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _detection_fixtures import NUM_CLASSES
from safetensors import safe_open
from safetensors.torch import load_file

from calibrate_teacher.detection.bake import bake_detector_temperature
from calibrate_teacher.detection.load import load_detection_teacher
from calibrate_teacher.errors import BakeError, InvalidValueError, OutputExistsError

T = 1.7


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return dfx.shared(tmp_path_factory.getbasetemp())


def run(path, name, images):
    session = ort.InferenceSession(str(path))
    return np.concatenate([session.run([name], {"images": images[i : i + 1].numpy()})[0] for i in range(len(images))])


def test_baked_ultralytics_onnx(tmp_path, fx):
    out = tmp_path / "dense.onnx"
    result = bake_detector_temperature(fx.onnx, T, out=out, probe=fx.images[:4], device="cpu")
    assert result.path == out and out.is_file() and result.max_abs_error <= result.tolerance
    assert result.format == "onnx" and len(result.changed) == 1
    before, after = run(fx.onnx, "output0", fx.images), run(out, "output0", fx.images)
    assert np.array_equal(before[:, :4], after[:, :4])  # boxes bit-identical
    with torch.no_grad():
        z = fx.dense.raw(fx.images)["logits"].double()
    assert np.abs(after[:, 4:] - torch.sigmoid(z / T).numpy()).max() < 1e-5  # scores = sigmoid(z / T)
    baked = onnx.load(str(out))
    meta = {p.key: p.value for p in baked.metadata_props}
    assert meta["names"] == "{0: 'square', 1: 'disc', 2: 'bar'}" and meta["imgsz"] == "[64, 64]"
    assert float(meta["calibrate_teacher.temperature"]) == T
    original = onnx.load(str(fx.onnx))
    assert [i.name for i in baked.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in baked.graph.output] == ["output0"]
    assert baked.graph.input[0].type == original.graph.input[0].type
    # the baked teacher reads z / T
    teacher = load_detection_teacher(out, device="cpu")
    for i, d in enumerate(teacher.detect(fx.images[:3])):
        assert torch.allclose(d.logits.double(), z[i].T / T, rtol=0, atol=1e-5 * max(1, float(z.abs().max()) / T))


def test_baked_yolox_leaves_objectness_alone(tmp_path, fx):
    out = tmp_path / "yolox.onnx"
    result = bake_detector_temperature(fx.yolox_onnx, T, out=out, device="cpu")
    assert any("random" in n for n in result.notes)  # no probe given: said so
    assert len(result.changed) == 1  # the class Sigmoid's input only, not objectness
    before, after = run(fx.yolox_onnx, "output", fx.images), run(out, "output", fx.images)
    assert np.array_equal(before[..., :5], after[..., :5])  # boxes and objectness bit-identical
    with torch.no_grad():
        z = fx.dense.raw(fx.images)["logits"].double().transpose(1, 2)
    assert np.abs(after[..., 5:] - torch.sigmoid(z / T).numpy()).max() < 1e-5


def test_baked_named_outputs(tmp_path, fx):
    out = tmp_path / "generic.onnx"
    bake_detector_temperature(
        fx.generic_onnx, T, out=out, boxes_output="boxes", scores_output="scores", probe=fx.batches(4), device="cpu"
    )
    before, after = run(fx.generic_onnx, "boxes", fx.images), run(out, "boxes", fx.images)
    assert np.array_equal(before, after)
    with torch.no_grad():
        z = fx.dense.raw(fx.images)["logits"].double().transpose(1, 2)
    assert np.abs(run(out, "scores", fx.images) - torch.sigmoid(z / T).numpy()).max() < 1e-5


@pytest.mark.parametrize(
    ("weights", "arch", "layer"),
    [
        ("dense_weights", "dense_arch", "head.classification_head.cls_logits"),
        ("two_stage_weights", "two_stage_arch", "roi_heads.box_predictor.cls_score"),
    ],
)
def test_baked_state_dict_divides_the_class_layer_only(tmp_path, fx, weights, arch, layer):
    source = getattr(fx, weights)
    out = tmp_path / source.name
    result = bake_detector_temperature(source, T, out=out, arch=getattr(fx, arch), probe=fx.images[:4], device="cpu")
    assert result.changed == (f"{layer}.weight", f"{layer}.bias")
    before, after = load_file(source), load_file(out)
    assert list(before) == list(after)  # keys unchanged
    for key, value in before.items():
        if key.startswith(layer + "."):
            assert torch.equal(after[key], (value.double() / T).float())
        else:
            assert torch.equal(after[key], value), key  # box regression, objectness, backbone untouched
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert float(meta["calibrate_teacher.temperature"]) == T and meta["calibrate_teacher.head"] == layer


def test_baked_torch_save_state_dict(tmp_path, fx):
    source = tmp_path / "two_stage.pt"
    torch.save({"model": fx.two_stage.state_dict()}, source)  # nested, as many checkpoints are
    out = tmp_path / "baked" / "two_stage.pt"
    out.parent.mkdir()
    bake_detector_temperature(source, T, out=out, arch=fx.two_stage_arch, probe=fx.images[:2], device="cpu")
    baked = torch.load(out, weights_only=True)["model"]
    w = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(baked[w], (fx.two_stage.state_dict()[w].double() / T).float())
    key = "roi_heads.box_predictor.bbox_pred.weight"
    assert torch.equal(baked[key], fx.two_stage.state_dict()[key])


def test_bake_refuses_overwrite_and_bad_values(tmp_path, fx):
    out = tmp_path / "dense.onnx"
    bake_detector_temperature(fx.onnx, T, out=out, device="cpu")
    stamp = out.stat().st_mtime_ns
    with pytest.raises(OutputExistsError):
        bake_detector_temperature(fx.onnx, T, out=out, device="cpu")
    assert out.stat().st_mtime_ns == stamp
    bake_detector_temperature(fx.onnx, 2.5, out=out, overwrite=True, device="cpu")
    assert float({p.key: p.value for p in onnx.load(str(out)).metadata_props}["calibrate_teacher.temperature"]) == 2.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidValueError):
            bake_detector_temperature(fx.onnx, bad, out=tmp_path / "x.onnx", device="cpu")
    with pytest.raises(InvalidValueError, match="keeps the format"):
        bake_detector_temperature(fx.onnx, T, out=tmp_path / "x.safetensors", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx"]  # no staging left behind


def test_default_output_path(tmp_path, fx):
    source = tmp_path / "det.onnx"
    source.write_bytes(fx.onnx.read_bytes())
    result = bake_detector_temperature(source, T, device="cpu")
    assert result.path == tmp_path / "det.calibrated.onnx" and result.path.is_file()
    assert load_detection_teacher(result.path, device="cpu").num_classes == NUM_CLASSES


def yolov5_like(fx):
    """One Sigmoid over the whole head [B, N, 5 + C], boxes computed from it (as YOLOv5 exports)."""
    dense = fx.dense
    g = dfx._Graph(dense)
    feat = g.features("images")
    layers = [
        dense.head.regression_head.bbox_reg,
        dense.head.regression_head.bbox_ctrness,
        dense.head.classification_head.cls_logits,
    ]
    head = torch.nn.Conv2d(16, 5 + NUM_CLASSES, 1)
    with torch.no_grad():
        head.weight.copy_(torch.cat([m.weight for m in layers]))
        head.bias.copy_(torch.cat([m.bias for m in layers]))
    raw = g.op("Transpose", [g.flat(g.conv(feat, head, "head.all"), 5 + NUM_CLASSES)], perm=[0, 2, 1])[0]
    y = g.op("Sigmoid", [raw])[0]

    def cut(a, b):
        starts = g.const(f"s{a}", np.array([a], np.int64))
        ends = g.const(f"e{b}", np.array([b], np.int64))
        return g.op("Slice", [y, starts, ends, g.const(f"ax{a}", np.array([2], np.int64))])[0]

    box = g.op("Mul", [cut(0, 4), g.const("scale", np.array(64.0, np.float32))])[0]
    out = g.op("Concat", [box, cut(4, 5 + NUM_CLASSES)], axis=2)[0]
    return g.model([(out, "output0", ["batch", 64, 5 + NUM_CLASSES])], "batch", {})


def test_a_sigmoid_shared_by_objectness_and_classes_cannot_be_baked(tmp_path, fx):
    path = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(fx), str(path))
    teacher = load_detection_teacher(path, device="cpu")  # readable: one Sigmoid, objectness in column 4
    assert teacher.layout == "yolox" and teacher.reading.objectness
    with torch.no_grad():
        z = fx.dense.raw(fx.images[:2])["logits"]
    for i, d in enumerate(teacher.detect(fx.images[:2])):
        assert torch.allclose(d.logits, z[i].T, atol=1e-4)
    with pytest.raises(BakeError, match="objectness and class scores both"):
        bake_detector_temperature(path, T, out=tmp_path / "baked.onnx", device="cpu")
    assert not (tmp_path / "baked.onnx").exists()
