"""Dense-detector soft labels (#14): write -> read round-trip vs the teacher's logits / T."""

import json

import _detection_fixtures as dfx
import numpy as np
import pytest
import torch
from _detection_fixtures import NUM_CLASSES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrate_teacher.detection.cache import FORMAT, export_detection_soft_labels, open_detection_cache
from calibrate_teacher.detection.load import load_detection_teacher
from calibrate_teacher.errors import CacheError, InvalidValueError, OutputExistsError

T = 1.7


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return dfx.shared(tmp_path_factory.getbasetemp())


def expected_rows(detections, top):
    """Reference cut, written independently: rank by max_c sigmoid(z_c / T) * sigmoid(obj), keep top."""
    z = detections.logits.double() / T
    score = torch.sigmoid(z).max(dim=1).values
    if detections.objectness is not None:
        score = score * torch.sigmoid(detections.objectness.double())
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))[:top]
    return order, z


def test_dense_round_trip_is_exact(tmp_path, fx):
    teacher = load_detection_teacher(fx.yolox_onnx, device="cpu")
    out = tmp_path / "cache"
    info = export_detection_soft_labels(teacher, fx.batches(5), out, temperature=T, top_candidates=10, shard_images=6)
    assert (info.num_images, info.num_candidates, info.shards, info.layout) == (16, 160, 3, "dense")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["calibration"]["temperature"] == T
    assert manifest["selection"]["top_candidates"] == 10 and manifest["teacher"]["head"] == "sigmoid"
    cache = open_detection_cache(out, verify=True)
    assert len(cache) == 16 and cache.image_ids == list(fx.image_ids) and cache.temperature == T
    found = teacher.detect(fx.images)  # identity transforms: input pixels are original pixels
    for image_id, d in zip(fx.image_ids, found, strict=True):
        order, z = expected_rows(d, 10)
        row = cache[image_id]
        assert np.array_equal(row.logits, z[order].float().numpy())  # bit-exact z / T
        assert np.array_equal(row.boxes, d.boxes[order].clamp(0, 64).numpy())
        assert np.array_equal(row.objectness, d.objectness[order].numpy())  # objectness raw
        assert row.logits.shape == (10, NUM_CLASSES)
    assert 999 not in cache
    with pytest.raises(KeyError):
        cache[999]


def test_softmax_topk_layout(tmp_path, fx):
    teacher = load_detection_teacher(fx.two_stage_weights, arch=fx.two_stage_arch, device="cpu")
    out = tmp_path / "cache"
    export_detection_soft_labels(teacher, fx.batches(8), out, temperature=T, top_candidates=5, top_k=2, dtype="float16")
    cache = open_detection_cache(out)
    for image_id, d in zip(fx.image_ids, teacher.detect(fx.images), strict=True):
        z = d.logits.double() / T
        score = torch.softmax(z, dim=1)[:, 1:].max(dim=1).values  # background first
        order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))[:5]
        row = cache[image_id]
        assert row.logits is None
        top = z[order].topk(2, dim=1)
        assert np.array_equal(row.topk_index, top.indices.int().numpy())
        assert np.array_equal(row.topk_logits, top.values.half().numpy())
        assert np.array_equal(row.lse, torch.logsumexp(z[order], dim=1).float().numpy())


def test_cache_refusals(tmp_path, fx):
    teacher = load_detection_teacher(fx.onnx, device="cpu")
    out = tmp_path / "cache"
    export_detection_soft_labels(teacher, fx.batches(8)[:1], out, temperature=T)
    with pytest.raises(OutputExistsError):
        export_detection_soft_labels(teacher, fx.batches(8)[:1], out, temperature=T)
    with pytest.raises(InvalidValueError, match="twice"):
        export_detection_soft_labels(teacher, fx.batches(8)[:1] * 2, tmp_path / "dup", temperature=T)
    assert not (tmp_path / "dup").exists()  # nothing left half-written
    with pytest.raises(InvalidValueError, match="top_k"):
        export_detection_soft_labels(teacher, fx.batches(8), tmp_path / "k", temperature=T, top_k=2)
    with pytest.raises(InvalidValueError):
        export_detection_soft_labels(teacher, fx.batches(8), tmp_path / "t", temperature=0.0)
    shard = out / "shard-00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CacheError, match="sha256"):
        open_detection_cache(out, verify=True)
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        open_detection_cache(tmp_path)


class _Fixed:
    """A stand-in teacher returning given candidates (the cache needs only the protocol)."""

    format, background, class_names, input_spec, device = "onnx", "none", None, None, "cpu"

    def __init__(self, path, found, head="sigmoid"):
        self.path, self.found, self.head, self.notes = path, found, head, []
        self.num_classes = found[0].logits.shape[1]
        self.calls = 0

    def detect(self, images):
        out = self.found[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=7),
    top=st.integers(1, 15),
    shard=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, counts, top, shard, seed):
    from calibrate_teacher.detection.base import DetectionBatch, Detections, GroundTruth, ImageTransform

    rng = np.random.default_rng(seed)
    found = [
        Detections(
            boxes=torch.from_numpy(rng.uniform(0, 50, (n, 4)).astype(np.float32)),
            logits=torch.from_numpy(rng.normal(0, 4, (n, 3)).astype(np.float32)),
            head="sigmoid",
            background="none",
        )
        for n in counts
    ]
    empty = GroundTruth(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
    batches = [
        DetectionBatch(torch.zeros(1, 3, 8, 8), (10 + i,), (ImageTransform(1.0, 1.0, 0.0, 0.0, 64, 64),), (empty,))
        for i in range(len(counts))
    ]
    out = tmp_path_factory.mktemp("prop") / "cache"
    teacher = _Fixed(out.parent / "teacher.onnx", found)
    export_detection_soft_labels(teacher, batches, out, temperature=T, top_candidates=top, shard_images=shard)
    cache = open_detection_cache(out, verify=True)
    assert cache.image_ids == [10 + i for i in range(len(counts))]
    for i, d in enumerate(found):
        order, z = expected_rows(d, top)
        row = cache[10 + i]
        assert row.logits.shape == (len(order), 3)
        assert np.array_equal(row.logits, z[order].float().numpy())
        assert np.array_equal(row.boxes, d.boxes[order].numpy())
