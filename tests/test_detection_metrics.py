"""Detection metrics (#14): NMS, matching, D-ECE against float64 loops, mAP against pycocotools."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate_teacher.detection._nms import box_iou, class_nms
from calibrate_teacher.detection.base import GroundTruth, OperatingPoint
from calibrate_teacher.detection.matching import match_detections
from calibrate_teacher.detection.metrics import (
    DetectionRecords,
    MeanAveragePrecision,
    box_position_features,
    coco_map,
    detection_calibration,
    detection_calibration_error,
)
from calibrate_teacher.errors import MissingDependencyError


def _gt(boxes, labels, crowd=None):
    n = len(labels)
    return GroundTruth(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(crowd or [False] * n, dtype=torch.bool),
    )


# --- NMS ---------------------------------------------------------------------------------------


def _reference_nms(boxes, scores, labels, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        ok = True
        for k in keep:
            if labels[k] != labels[i]:
                continue
            x1, y1 = max(boxes[i][0], boxes[k][0]), max(boxes[i][1], boxes[k][1])
            x2, y2 = min(boxes[i][2], boxes[k][2]), min(boxes[i][3], boxes[k][3])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            a = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            b = (boxes[k][2] - boxes[k][0]) * (boxes[k][3] - boxes[k][1])
            if inter / (a + b - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_equals_reference_loop(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1)
    scores = rng.uniform(0, 1, 60).round(2)  # ties, broken by index
    labels = rng.integers(0, 3, 60)
    got = class_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), 0.4).tolist()
    assert got == _reference_nms(boxes.tolist(), scores.tolist(), labels.tolist(), 0.4)


def test_box_iou_hand_worked():
    iou = box_iou(torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([[2.0, 2, 6, 6], [10, 10, 12, 12], [0, 0, 4, 4]]))
    torch.testing.assert_close(iou, torch.tensor([[4 / 28, 0.0, 1.0]]))


# --- matching ----------------------------------------------------------------------------------


def test_greedy_takes_score_order_not_best_iou():
    gt = _gt([[0, 0, 10, 10]], [0])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 8]])  # IoU 1.0 (low score), 0.8 (high score)
    r = match_detections(boxes, torch.tensor([0.5, 0.9]), torch.tensor([0, 0]), gt)
    assert r.status.tolist() == [0, 1] and r.gt_index.tolist() == [-1, 0]


def test_greedy_each_detection_takes_best_free_gt():
    gt = _gt([[0, 0, 10, 10], [0, 0, 10, 9]], [0, 0])
    boxes = torch.tensor([[0.0, 0, 10, 9.5], [0, 0, 10, 9.5]])
    r = match_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), gt)
    assert r.status.tolist() == [1, 1] and r.gt_index.tolist() == [0, 1]
    # a wrong class never matches; below match_iou never matches
    r = match_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 0]), gt, match_iou=0.99)
    assert r.status.tolist() == [0, 0]


def test_crowd_matches_are_ignored_and_absorb_many():
    gt = _gt([[0, 0, 10, 10], [20, 0, 60, 40]], [0, 0], [False, True])
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [22, 2, 30, 10], [25, 5, 35, 15], [80, 80, 90, 90]])
    r = match_detections(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([0, 0, 0, 0, 0]), gt)
    # second box: the non-crowd gt is taken, it does not overlap the crowd -> FP; 3rd/4th inside the crowd -> ignored
    assert r.status.tolist() == [1, 0, -1, -1, 0]


def test_netcal_many_to_one():
    gt = _gt([[0, 0, 10, 10], [8, 0, 18, 10]], [0, 1])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [6, 0, 16, 10]])
    labels = torch.tensor([0, 0, 0])
    scores = torch.tensor([0.9, 0.8, 0.7])
    greedy = match_detections(boxes, scores, labels, gt)
    many = match_detections(boxes, scores, labels, gt, matching="netcal")
    assert greedy.status.tolist() == [1, 0, 0]
    # two detections share the box; the third overlaps the class-1 box most -> FP although IoU(gt0) = 0.4 < 0.5 anyway
    assert many.status.tolist() == [1, 1, 0] and many.gt_index.tolist() == [0, 0, -1]


def _cocoeval_status(images, dets, iou=0.5):
    """TP/FP/ignored of each detection by pycocotools' own evaluateImg."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": str(c)} for c in range(3)]}
    for i, (boxes, labels, crowd) in enumerate(images):
        gt["images"].append({"id": i + 1, "width": 100, "height": 100})
        for b, c, k in zip(boxes, labels, crowd, strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                    "iscrowd": k,
                }
            )
    res = [
        {
            "image_id": i + 1,
            "category_id": c + 1,
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "score": s,
            "id": j + 1,
        }
        for j, (i, b, c, s) in enumerate(dets)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.maxDets = [1000]
        ev.evaluate()
    status = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        for d, m, ig in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0], strict=True):
            status[d - 1] = -1 if ig else (1 if m > 0 else 0)
    return [status[j] for j in range(len(dets))]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_pycocotools_evaluate_img(seed):
    rng = np.random.default_rng(seed)
    images, dets, ours = [], [], []
    for i in range(4):
        m = int(rng.integers(0, 6))
        xy = rng.uniform(0, 60, (m, 2))
        gboxes = np.concatenate([xy, xy + rng.uniform(8, 30, (m, 2))], 1).round(1)
        glabels = rng.integers(0, 3, m)
        gcrowd = (rng.uniform(size=m) < 0.2).astype(int)
        images.append((gboxes.tolist(), glabels.tolist(), gcrowd.tolist()))
        n = int(rng.integers(1, 12))
        base = gboxes[rng.integers(0, m, n)] if m else np.tile([[10.0, 10, 30, 30]], (n, 1))
        dboxes = (base + rng.normal(0, 3, (n, 4))).round(1)
        dboxes[:, 2:] = np.maximum(dboxes[:, 2:], dboxes[:, :2] + 1)
        dlabels = np.where(rng.uniform(size=n) < 0.7, glabels[rng.integers(0, m, n)] if m else 0, rng.integers(0, 3, n))
        dscores = rng.uniform(0, 1, n).round(3)
        start = len(dets)
        dets += [(i, dboxes[k].tolist(), int(dlabels[k]), float(dscores[k])) for k in range(n)]
        r = match_detections(
            torch.tensor(dboxes, dtype=torch.float32),
            torch.tensor(dscores),
            torch.tensor(dlabels),
            _gt(gboxes.tolist(), glabels.tolist(), [bool(c) for c in gcrowd]),
        )
        ours += r.status.tolist()
        assert len(ours) == len(dets) and start < len(dets)
    assert ours == _cocoeval_status(images, dets)


# --- D-ECE -------------------------------------------------------------------------------------


def _reference_dece(conf, hits, features, bins):
    """netcal's D-ECE written as a plain float64 loop over detections and bins."""
    cols = [conf] + ([] if features is None else [features[:, k] for k in range(features.shape[1])])
    bins = [bins] * len(cols) if isinstance(bins, int) else bins
    cells = {}
    for j in range(len(conf)):
        key = []
        for col, m in zip(cols, bins, strict=True):
            v = float(col[j])
            edges = np.linspace(0.0, 1.0, m + 1)  # netcal's edges; bin b holds [e_b, e_b+1), 1.0 in the last
            b = 0
            for k in range(1, m):
                if v >= edges[k]:
                    b = k
            key.append(b)
        cells.setdefault(tuple(key), []).append(j)
    n = len(conf)
    dece = over = under = 0.0
    for members in cells.values():
        c = sum(float(conf[j]) for j in members) / len(members)
        p = sum(float(hits[j]) for j in members) / len(members)
        w = len(members) / n
        dece += w * abs(p - c)
        over += w * max(c - p, 0.0)
        under += w * max(p - c, 0.0)
    return dece, over, under


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [1, 7, 20])
def test_dece_confidence_only_equals_loop(seed, bins):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0, 1, 300)
    conf[:12] = [0.0, 1.0, 0.5, 0.25, 0.05, 0.95, 0.1, 0.2, 0.3, 0.7, 0.75, 0.6]  # edges of many bin counts
    hits = (rng.uniform(size=300) < conf**1.5).astype(float)
    e = detection_calibration_error(torch.tensor(conf), torch.tensor(hits), n_bins=bins)
    ref = _reference_dece(conf, hits, None, bins)
    assert abs(e.dece - ref[0]) < 1e-12 and abs(e.over - ref[1]) < 1e-12 and abs(e.under - ref[2]) < 1e-12
    assert abs(e.dece - e.over - e.under) < 1e-12 and e.count == 300


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bins", [5, (4, 3, 3, 2, 2)])
def test_dece_with_position_equals_loop(seed, bins):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0, 1, 400)
    xy = rng.uniform(0, 80, (400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (400, 2))], 1)
    boxes[:5] = [[0, 0, 100, 50], [50, 25, 100, 50], [0, 0, 20, 10], [40, 20, 60, 30], [20, 0, 60, 50]]
    feats = box_position_features(torch.tensor(boxes), 100.0, 50.0)
    hits = (rng.uniform(size=400) < conf).astype(float)
    e = detection_calibration_error(torch.tensor(conf), torch.tensor(hits), features=feats, n_bins=bins)
    ref = _reference_dece(conf, hits, feats.numpy(), bins)
    assert abs(e.dece - ref[0]) < 1e-12 and abs(e.over - ref[1]) < 1e-12 and abs(e.under - ref[2]) < 1e-12
    assert e.bins == ((5,) * 5 if bins == 5 else bins)


def test_dece_hand_worked_and_edges():
    e = detection_calibration_error(
        torch.tensor([0.9, 0.9, 0.2, 0.3], dtype=torch.float64), torch.tensor([1, 0, 0, 1]), n_bins=2
    )
    assert (round(e.dece, 12), round(e.over, 12), round(e.under, 12)) == (0.325, 0.2, 0.125)
    # 0.5 sits in the upper bin ([lo, hi)), 1.0 in the last
    e = detection_calibration_error(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]), n_bins=2)
    assert e.dece == pytest.approx(0.25)
    assert detection_calibration_error(torch.zeros(0), torch.zeros(0)).dece == 0.0


def test_min_bin_count_as_netcal_sample_threshold():
    conf = torch.tensor([0.1, 0.9, 0.9, 0.9])
    hits = torch.tensor([1.0, 0, 0, 1])
    full = detection_calibration_error(conf, hits, n_bins=2)
    thin = detection_calibration_error(conf, hits, n_bins=2, min_bin_count=2)
    assert full.dece == pytest.approx(0.25 * 0.9 + 0.75 * (0.9 - 1 / 3))
    assert thin.dece == pytest.approx(0.75 * (0.9 - 1 / 3))


def test_per_class_report_equals_loop():
    rng = np.random.default_rng(3)
    n = 200
    scores = rng.uniform(0.3, 1, n)
    labels = rng.integers(0, 3, n)
    status = np.where(rng.uniform(size=n) < 0.1, -1, (rng.uniform(size=n) < scores).astype(int))
    boxes = np.concatenate([rng.uniform(0, 50, (n, 2)), rng.uniform(50, 100, (n, 2))], 1)
    feats = box_position_features(torch.tensor(boxes), 100.0, 100.0)
    rec = DetectionRecords(
        torch.tensor(scores),
        torch.tensor(labels),
        torch.tensor(status, dtype=torch.int8),
        feats,
        torch.zeros(n, dtype=torch.int64),
        torch.tensor(boxes, dtype=torch.float32),
    )
    rep = detection_calibration(
        rec,
        num_gt=[50, 60, 70],
        class_names=["a", "b", "c"],
        temperature=1.0,
        operating_point=OperatingPoint(),
        matching="greedy",
        num_images=1,
        mean_ap=MeanAveragePrecision(None, None, "x"),
        n_bins=10,
        position_bins=3,
    )
    kept = status >= 0
    ref = _reference_dece(scores[kept], (status[kept] == 1).astype(float), None, 10)
    assert abs(rep.dece.dece - ref[0]) < 1e-12
    ref_pos = _reference_dece(scores[kept], (status[kept] == 1).astype(float), feats.numpy()[kept], 3)
    assert abs(rep.dece_position.dece - ref_pos[0]) < 1e-12
    for c, (name, e, num_gt) in enumerate(rep.per_class):
        mine = kept & (labels == c)
        ref = _reference_dece(scores[mine], (status[mine] == 1).astype(float), None, 10)
        assert name == "abc"[c] and num_gt == [50, 60, 70][c] and abs(e.dece - ref[0]) < 1e-12
    assert rep.num_tp == int((status == 1).sum()) and rep.num_ignored == int((status == -1).sum())
    doc = rep.to_json()
    assert doc["operating_point"]["score_threshold"] == 0.3 and doc["map"] is None and doc["map_note"] == "x"


def test_position_features_hand_worked():
    f = box_position_features(torch.tensor([[10.0, 20, 30, 60], [-5, 0, 250, 100]]), 200.0, 100.0)
    torch.testing.assert_close(f, torch.tensor([[0.1, 0.4, 0.1, 0.4], [0.6125, 0.5, 1.0, 1.0]], dtype=torch.float64))


# --- mAP ---------------------------------------------------------------------------------------


def test_map_equals_pycocotools_directly():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(5)
    gt = {"images": [], "annotations": [], "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]}
    res = []
    for i in range(6):
        gt["images"].append({"id": i, "width": 100, "height": 80})
        for _ in range(int(rng.integers(1, 5))):
            x, y, w, h = rng.uniform(0, 50), rng.uniform(0, 40), rng.uniform(5, 40), rng.uniform(5, 30)
            cat = int(rng.choice([4, 9]))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            for _ in range(2):
                j = rng.normal(0, 3, 4)
                res.append(
                    {
                        "image_id": i,
                        "category_id": cat,
                        "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                        "score": float(rng.uniform()),
                    }
                )
    ours = coco_map(gt, [dict(r) for r in res], max_detections=100)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours.map == ev.stats[0] and ours.map50 == ev.stats[1] and ours.reason == ""
    assert 0 < ours.map < ours.map50 <= 1


def test_map_without_results_or_ground_truth():
    gt = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    assert coco_map(gt, []).reason == "no ground-truth boxes to score"
    gt["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}]
    assert coco_map(gt, []) == MeanAveragePrecision(0.0, 0.0)


def test_map_without_pycocotools(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'calibrate-teacher\[detection\]'"):
        coco_map({"annotations": []}, [])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60), st.integers(1, 25), st.randoms())
def test_dece_bounded_and_permutation_invariant(rows, bins, rnd):
    conf = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    hits = torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    e = detection_calibration_error(conf, hits, n_bins=bins)
    order = list(range(len(rows)))
    rnd.shuffle(order)
    p = detection_calibration_error(conf[order], hits[order], n_bins=bins)
    assert 0.0 <= e.dece <= 1.0 and abs(e.dece - e.over - e.under) < 1e-12
    assert abs(p.dece - e.dece) < 1e-12
