"""RoI classification metrics of two-stage teachers on sampled proposals (#14, item 3)."""

from __future__ import annotations

import json

import pytest
import torch
from _coco_fixtures import CLASS_NAMES, FakeDetector, standard_images, write_coco

from calibrate_teacher.detection.base import GroundTruth, ImageTransform, OperatingPoint
from calibrate_teacher.detection.coco import open_coco
from calibrate_teacher.detection.proposals import (
    ProposalSampler,
    label_proposals,
    roi_classification,
    roi_unavailable,
    sample_proposals,
    to_input,
)
from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.metrics import calibration_metrics

POINT = OperatingPoint(score_threshold=0.3, max_detections=100, nms_iou=0.5, match_iou=0.5)


def _gt(boxes, labels, crowd=None):
    return GroundTruth(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        crowd=torch.tensor(crowd if crowd is not None else [False] * len(labels), dtype=torch.bool),
    )


def _iou64(a, b):
    # float64 reference, one pair at a time
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize(("background", "bg", "shift"), [("first", 0, 1), ("last", 3, 0)])
def test_labels_hand_worked(background, bg, shift):
    # GT: class 2 at [0, 0, 10, 10], class 0 at [20, 0, 40, 10], a crowd region of class 1 at [0, 20, 20, 40]
    gt = _gt([[0, 0, 10, 10], [20, 0, 40, 10], [0, 20, 20, 40]], [2, 0, 1], [False, False, True])
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],  # IoU 1 with class 2
            [0, 0, 10, 5],  # IoU 50 / 100 = 0.5 exactly: foreground (>= 0.5)
            [0, 0, 10, 4],  # IoU 0.4: background
            [20, 0, 30, 10],  # IoU 100 / 200 = 0.5 with class 0
            [5, 0, 25, 10],  # IoU 50 / 250 with class 2, 50 / 350 with class 0: background
            [0, 20, 20, 40],  # exactly the crowd region: crowd is excluded, so background
        ],
        dtype=torch.float32,
    )
    labels, best = label_proposals(boxes, gt, num_classes=3, background=background)
    assert labels.tolist() == [2 + shift, 2 + shift, bg, 0 + shift, bg, bg]
    assert best.tolist() == pytest.approx([1.0, 0.5, 0.4, 0.5, 0.2, 0.0], abs=1e-12)
    with pytest.raises(InvalidValueError, match="background"):
        label_proposals(boxes, gt, num_classes=3, background="none")


def test_gt_only_sample_is_the_non_crowd_gt():
    gt = _gt([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 2], [False, True])
    cfg = ProposalSampler(jitter_per_box=0, random_boxes=0)
    for background, want in (("first", 2), ("last", 1)):
        s = sample_proposals(gt, width=100, height=100, num_classes=3, background=background, sampler=cfg)
        assert s.boxes.tolist() == [[10, 10, 50, 50]] and s.labels.tolist() == [want]  # crowd box not a proposal


def test_sample_labels_match_a_float64_reference_and_caps_hold():
    gt = _gt([[10, 10, 40, 40], [50, 20, 90, 35], [5, 60, 30, 95]], [0, 2, 1], [False, False, True])
    s = sample_proposals(gt, width=100, height=100, num_classes=3, background="first", seed=3, image_id=7)
    assert 250 < len(s.labels) <= 2 + 2 * 32 + 256  # the GT, 32 jittered copies each, 256 random (< 1 px dropped)
    n_fg = int((s.labels != 0).sum())
    assert 0 < n_fg <= 128  # positive_fraction 0.25 of 512
    keep = [(b, c) for b, c, k in zip(gt.boxes.tolist(), gt.labels.tolist(), gt.crowd.tolist(), strict=True) if not k]
    for box, label in zip(s.boxes.double().tolist(), s.labels.tolist(), strict=True):
        assert 0 <= box[0] < box[2] <= 100 and 0 <= box[1] < box[3] <= 100 and box[2] - box[0] >= 1
        ious = [_iou64(box, g) for g, _ in keep]
        best = max(range(len(ious)), key=ious.__getitem__)
        # float32 boxes: stay clear of the threshold itself
        if abs(ious[best] - 0.5) > 1e-5:
            assert label == (keep[best][1] + 1 if ious[best] >= 0.5 else 0)


def test_foreground_fraction_cap():
    gt = _gt([[100, 100, 300, 300]], [1])
    many = ProposalSampler(jitter_per_box=2000, shift=0.01, scale=0.01, random_boxes=0)
    s = sample_proposals(gt, width=1000, height=1000, num_classes=3, background="last", sampler=many)
    assert len(s.labels) == 128 and bool((s.labels == 1).all())  # only fg candidates: 128, no filling
    mixed = ProposalSampler(jitter_per_box=2000, shift=0.01, scale=0.01, random_boxes=1000)
    s = sample_proposals(gt, width=1000, height=1000, num_classes=3, background="last", sampler=mixed)
    assert len(s.labels) == 512 and int((s.labels == 1).sum()) == 128 and int((s.labels == 3).sum()) == 384
    small = ProposalSampler(batch_size_per_image=10, positive_fraction=0.5, jitter_per_box=5, random_boxes=0)
    s = sample_proposals(gt, width=1000, height=1000, num_classes=3, background="first", sampler=small)
    assert len(s.labels) <= 10 and int((s.labels != 0).sum()) <= 5


def test_seeded_determinism():
    gt = _gt([[10, 10, 40, 40]], [0])
    kw = {"width": 64, "height": 64, "num_classes": 3, "background": "first"}
    a = sample_proposals(gt, seed=1, image_id=5, **kw)
    b = sample_proposals(gt, seed=1, image_id=5, **kw)
    c = sample_proposals(gt, seed=2, image_id=5, **kw)
    d = sample_proposals(gt, seed=1, image_id=6, **kw)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.boxes, c.boxes) and not torch.equal(a.boxes, d.boxes)


def test_to_input_inverts_to_original():
    from calibrate_teacher.detection.base import Detections, to_original

    t = ImageTransform(scale_x=1.5, scale_y=1.5, pad_x=16.0, pad_y=0.0, width=64, height=64)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0]])
    assert to_input(boxes, t).tolist() == [[17.5, 3.0, 61.0, 60.0], [16.0, 0.0, 112.0, 96.0]]
    back = to_original(Detections(to_input(boxes, t), torch.zeros(2, 4), "softmax", "first"), t)
    assert torch.allclose(back.boxes, boxes, atol=1e-5)


def test_bad_sampler_values():
    with pytest.raises(InvalidValueError, match="batch_size_per_image"):
        ProposalSampler(batch_size_per_image=0)
    with pytest.raises(InvalidValueError, match="positive_fraction"):
        ProposalSampler(positive_fraction=1.5)


# --------------------------------------------------------------------------- teachers


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    import _detection_fixtures as dfx

    return dfx.shared(tmp_path_factory.getbasetemp())


def _teacher(fx, layout):
    from calibrate_teacher.detection.load import load_detection_teacher

    path = fx.two_stage_weights if layout == "torchvision" else fx.two_stage_d2_weights
    kwargs = {"layout": layout}
    return load_detection_teacher(path, arch=fx.two_stage_arch, arch_kwargs=kwargs, device="cpu")


def _reference_logits(module, images, proposals):
    # the module's own pieces: backbone features, the cell holding each box's centre, box head, cls_score
    import _detection_fixtures as dfx

    with torch.no_grad():
        feat = module.backbone(images)
        out = []
        for i, boxes in enumerate(proposals):
            rows = []
            for x1, y1, x2, y2 in boxes.tolist():
                gx = min(max(int((x1 + x2) / 2 // dfx.STRIDE), 0), feat.shape[3] - 1)
                gy = min(max(int((y1 + y2) / 2 // dfx.STRIDE), 0), feat.shape[2] - 1)
                rows.append(module.roi_heads.box_predictor.cls_score(module.box_head(feat[i, :, gy, gx][None]))[0])
            out.append(torch.stack(rows))
    return out


def _source(fx, teacher, size=(96, 128)):
    import _detection_fixtures as dfx

    return open_coco(
        fx.annotations,
        images=fx.images_dir,
        classes=dfx.CLASS_NAMES,
        background=teacher.background,
        preprocess={"mode": "letterbox", "input_size": list(size)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["torchvision", "detectron2"])
def test_roi_logits_equal_the_modules_own_computation(fx, layout):
    teacher = _teacher(fx, layout)
    assert roi_unavailable(teacher) is None
    images = fx.images[:3]
    g = torch.Generator().manual_seed(0)
    corners = [torch.rand(n, 2, 2, generator=g) * 80 - 8 for n in (5, 1, 9)]  # some centres off the image
    proposals = [torch.cat([c.min(dim=1).values, c.max(dim=1).values], dim=1) for c in corners]
    got = teacher.roi_logits(images, proposals)
    want = _reference_logits(teacher.model, images, proposals)
    assert [tuple(z.shape) for z in got] == [(5, 4), (1, 4), (9, 4)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)  # float32: one row vs a batch
    # consistent with forward: the cell squares of forward's own proposals get forward's logits
    import _detection_fixtures as dfx

    with torch.no_grad():
        obj = teacher.model._rpn()[0](teacher.model.backbone(images[:1])).reshape(-1)
        forward = teacher.model(images[:1])[0]["logits"]
    keep = obj.topk(dfx.PROPOSALS).indices
    x0, y0 = (keep % dfx.GRID).float() * dfx.STRIDE, torch.div(keep, dfx.GRID, rounding_mode="floor").float() * 8
    squares = torch.stack([x0, y0, x0 + dfx.STRIDE, y0 + dfx.STRIDE], dim=1)
    torch.testing.assert_close(teacher.roi_logits(images[:1], [squares])[0], forward, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_metrics_equal_calibration_metrics_on_the_same_rows(fx):
    teacher = _teacher(fx, "torchvision")
    src = _source(fx, teacher)
    got = roi_classification(teacher, src, temperature=1.7, n_bins=10, seed=4, batch_size=5)
    assert got is not None
    logits, labels = [], []
    for batch in src.batches(batch_size=3):  # another batching: the sample is per image
        for gt, t, i, image in zip(batch.targets, batch.transforms, batch.image_ids, batch.images, strict=True):
            s = sample_proposals(
                gt, width=t.width, height=t.height, num_classes=3, background="first", seed=4, image_id=i
            )
            assert (t.scale_x, t.pad_x, t.pad_y) == (1.5, 16.0, 0.0)
            boxes = s.boxes * 1.5 + torch.tensor([16.0, 0.0, 16.0, 0.0])
            logits.append(_reference_logits(teacher.model, image[None], [boxes])[0])
            labels.append(s.labels)
    want = calibration_metrics(torch.cat(logits), torch.cat(labels), temperature=1.7, n_bins=10)
    assert got.num_samples == want.num_samples == sum(len(x) for x in labels)
    for name in ("accuracy", "nll", "brier", "ece", "ace", "adaece", "classwise_ece"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-6)
    assert got.temperature == 1.7 and got.num_classes == 4


@pytest.mark.slow
def test_jobs_report_roi_classification(fx):
    from calibrate_teacher.jobs._detection import calibrate_detector, evaluate_detector

    teacher = _teacher(fx, "detectron2")
    point = OperatingPoint(score_threshold=0.05)
    size = (128, 128)  # the fixture's forward wants a square input
    run = evaluate_detector(teacher, _source(fx, teacher, size), operating_point=point, n_bins=15)
    doc = json.loads(json.dumps(run.to_json(), allow_nan=False))
    block = doc["roi_classification"]
    assert "roi_classification_skipped" not in doc and block["seed"] == 0
    assert block["sampler"]["batch_size_per_image"] == 512 and block["sampler"]["positive_fraction"] == 0.25
    want = roi_classification(teacher, _source(fx, teacher, size), n_bins=15)
    assert want is not None and block["metrics"]["ece"] == pytest.approx(want.ece, abs=1e-12)
    assert block["proposals"] == want.num_samples and 0 < block["foreground"] < block["proposals"]
    fit = calibrate_detector(teacher, _source(fx, teacher, size), objective="nll", operating_point=point, n_bins=15)
    doc = json.loads(json.dumps(fit.to_json(), allow_nan=False))
    roi = doc["roi_classification"]
    assert roi["before"]["temperature"] == 1.0 and roi["after"]["temperature"] == fit.fit.temperature
    assert roi["before"]["ece"] == pytest.approx(want.ece, abs=1e-12)


# --------------------------------------------------------------------------- skipped, with a reason


def test_dense_teacher_gives_null_and_a_reason(tmp_path):
    from calibrate_teacher.jobs._detection import calibrate_detector, evaluate_detector

    write_coco(tmp_path, standard_images())
    src = open_coco(tmp_path / "instances.json", classes=CLASS_NAMES, preprocess={"mode": "letterbox",
                                                                                  "input_size": [64, 64]})  # fmt: skip
    doc = evaluate_detector(FakeDetector(), src, operating_point=POINT).to_json()
    assert doc["roi_classification"] is None and "dense (sigmoid) head" in doc["roi_classification_skipped"]
    assert roi_classification(FakeDetector(), src) is None
    softmax = FakeDetector(head="softmax", background="first", hit_logit=(5.0, 4.0, 3.0), distractor_logit=2.0)
    doc = calibrate_detector(softmax, src, objective="nll", operating_point=POINT).to_json()
    assert doc["roi_classification"] is None and "fake teacher cannot run its RoI head" in doc[
        "roi_classification_skipped"]  # fmt: skip


@pytest.mark.slow
def test_module_without_classify_proposals_is_a_reason_and_an_error(fx):
    teacher = _teacher(fx, "torchvision")
    module = teacher.model
    bare = type("Bare", (torch.nn.Module,), {"forward": lambda self, x: x})()
    teacher.model = bare
    try:
        assert "Bare has no classify_proposals" in (roi_unavailable(teacher) or "")
        with pytest.raises(TeacherError, match="classify_proposals"):
            teacher.roi_logits(fx.images[:1], [torch.zeros(1, 4)])
    finally:
        teacher.model = module
