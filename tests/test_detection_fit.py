"""Detection temperature fit (#14): NLL fits against scipy, the D-ECE search, re-evaluation per T."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from calibrate_teacher.detection.base import Detections, GroundTruth, OperatingPoint
from calibrate_teacher.detection.candidates import CandidatePool, detections_at
from calibrate_teacher.detection.fit import (
    fit_detection_temperature,
    nll_fit_set,
    sigmoid_nll_temperature,
    softmax_nll_temperature,
)
from calibrate_teacher.detection.metrics import detection_calibration_error
from calibrate_teacher.errors import InvalidValueError


def _scipy_t(nll, lo=0.05, hi=20.0):
    r = minimize_scalar(
        lambda lt: nll(math.exp(lt)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-12, "maxiter": 1000},
    )
    return math.exp(r.x)


def test_sigmoid_nll_equals_scipy():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (300, 5))
    y = (rng.uniform(size=(300, 5)) < 1 / (1 + np.exp(-z / 2.3))).astype(float)

    def nll(t):
        return float(np.mean(np.logaddexp(0, z / t) - y * z / t))

    t, steps = sigmoid_nll_temperature(torch.tensor(z), torch.tensor(y))
    assert abs(t - _scipy_t(nll)) < 1e-6 and steps < 30
    assert 1.5 < t < 3.5


def test_softmax_nll_equals_scipy():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (400, 6))
    p = np.exp(z / 0.6) / np.exp(z / 0.6).sum(1, keepdims=True)
    y = np.array([rng.choice(6, p=row) for row in p])

    def nll(t):
        zz = z / t
        return float(np.mean(np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1)) + zz.max(1) - zz[np.arange(400), y]))

    t, _ = softmax_nll_temperature(torch.tensor(z), torch.tensor(y))
    assert abs(t - _scipy_t(nll)) < 1e-6 and t < 1


def _pool(head="sigmoid", background="none", *, seed=0, images=12, scale=3.0, objectness=False):
    """Random images: GT boxes; candidates near them (some with the wrong class) and background boxes."""
    rng = np.random.default_rng(seed)
    c = 3
    pool = CandidatePool(head=head, background=background, num_classes=c, floor=0.001, max_candidates=500)
    for i in range(images):
        m = int(rng.integers(1, 4))
        xy = rng.uniform(0, 60, (m, 2))
        gboxes = np.concatenate([xy, xy + rng.uniform(15, 35, (m, 2))], 1)
        glabels = rng.integers(0, c, m)
        boxes, rows = [], []
        for g in range(m):
            for _ in range(3):
                boxes.append(gboxes[g] + rng.normal(0, 2.5, 4))
                row = rng.normal(-2, 1, c)
                k = glabels[g] if rng.uniform() < 0.75 else rng.integers(0, c)
                row[k] = rng.normal(1.0, 1.5)
                rows.append(row * scale)
        for _ in range(4):
            xy = rng.uniform(0, 80, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(5, 20, 2)]))
            rows.append(rng.normal(-1.5, 1.5, c) * scale)
        logits = np.array(rows)
        if head == "softmax":
            bg = rng.normal(0.5, 1, (len(rows), 1)) * scale
            logits = np.concatenate([bg, logits] if background == "first" else [logits, bg], 1)
        b = np.array(boxes)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 2)
        obj = torch.tensor(rng.normal(1, 1, len(rows)), dtype=torch.float32) if objectness else None
        det = Detections(
            torch.tensor(b, dtype=torch.float32),
            torch.tensor(logits, dtype=torch.float32),
            head,
            background,
            objectness=obj,
        )
        gt = GroundTruth(
            torch.tensor(gboxes, dtype=torch.float32), torch.tensor(glabels), torch.zeros(m, dtype=torch.bool)
        )
        pool.add(det, gt, image_id=i, width=100, height=100)
    return pool


POINT = OperatingPoint(score_threshold=0.3, max_detections=100, nms_iou=0.5, match_iou=0.5)


def test_fit_set_targets_hand_worked():
    pool = CandidatePool(head="sigmoid", background="none", num_classes=2)
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]])
    logits = torch.tensor([[2.0, 1.0], [1.0, -5.0], [-5.0, -5.0]])  # box 0 passes for both classes
    gt = GroundTruth(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([1]), torch.tensor([False]))
    pool.add(Detections(boxes, logits, "sigmoid", "none"), gt, image_id=1, width=100, height=100)
    z, y, obj = nll_fit_set(pool, POINT)
    # candidate 0: TP for class 1 (its class-0 detection is an FP) -> class 1; candidate 1: FP -> background
    assert y.tolist() == [1, -1] and torch.equal(z, logits[:2]) and obj is None


@pytest.mark.parametrize(("head", "background"), [("sigmoid", "none"), ("softmax", "first"), ("softmax", "last")])
def test_nll_fit_on_pool_equals_scipy(head, background):
    pool = _pool(head, background, seed=2)
    fit = fit_detection_temperature(pool, objective="nll", operating_point=POINT, grid=4)
    z, y, _ = nll_fit_set(pool, POINT)
    zz = z.double().numpy()
    if head == "sigmoid":
        t_target = np.zeros_like(zz)
        t_target[np.nonzero(y.numpy() >= 0)[0], y.numpy()[y.numpy() >= 0]] = 1

        def nll(t):
            return float(np.mean(np.logaddexp(0, zz / t) - t_target * zz / t))
    else:
        cols = np.where(
            y.numpy() >= 0, y.numpy() + (1 if background == "first" else 0), 0 if background == "first" else 3
        )

        def nll(t):
            a = zz / t
            lse = np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
            return float(np.mean(lse - a[np.arange(len(a)), cols]))

    assert abs(fit.temperature - _scipy_t(nll, 0.1, 10.0)) < 1e-6
    assert fit.objective_value == pytest.approx(nll(fit.temperature), abs=1e-12)
    assert fit.fit_samples == len(y) and fit.head == head


def test_objectness_nll_equals_scipy():
    pool = _pool(seed=4, objectness=True)
    fit = fit_detection_temperature(pool, objective="nll", operating_point=POINT, tol=1e-9, grid=4)
    z, y, o = nll_fit_set(pool, POINT)
    zz, oo = z.double().numpy(), o.double().numpy()
    target = np.zeros_like(zz)
    target[np.nonzero(y.numpy() >= 0)[0], y.numpy()[y.numpy() >= 0]] = 1

    def nll(t):
        p = 1 / (1 + np.exp(-oo))[:, None] / (1 + np.exp(-zz / t))
        return float(-np.mean(target * np.log(p) + (1 - target) * np.log1p(-p)))

    assert abs(fit.temperature - _scipy_t(nll, 0.1, 10.0)) < 1e-6
    assert fit.exact_up_to is None  # objectness: the T = 1 selection's reach is not known


def test_dece_search_finds_the_sweep_minimum_and_reevaluates():
    pool = _pool(seed=6, images=20)
    fit = fit_detection_temperature(pool, objective="dece", operating_point=POINT, grid=16)
    temps = [p.temperature for p in fit.sweep]
    assert 1.0 in temps and 1.5 in temps and len(temps) == 18
    assert fit.objective_value <= min(p.dece for p in fit.sweep) + 1e-15
    # the value at T is the D-ECE of the detections cut again at T
    rec, _ = detections_at(pool, fit.temperature, POINT)
    kept = rec.status >= 0
    e = detection_calibration_error(rec.scores[kept], (rec.status[kept] == 1).double(), n_bins=20)
    assert e.dece == fit.objective_value
    # a temperature moves which boxes pass the threshold: the counts in the sweep change with T
    counts = {p.num_detections for p in fit.sweep}
    assert len(counts) > 3
    rec_hi, _ = detections_at(pool, temps[-1], POINT)
    assert fit.sweep[-1].num_detections == rec_hi.status.numel()


def test_fixed_and_bad_options():
    pool = _pool(seed=1, images=3)
    fit = fit_detection_temperature(pool, objective="fixed", operating_point=POINT)
    assert fit.temperature == 1.5 and fit.objective_value is None
    assert fit_detection_temperature(pool, objective="fixed", temperature=2.0).temperature == 2.0
    with pytest.raises(InvalidValueError, match="only with objective='fixed'"):
        fit_detection_temperature(pool, objective="nll", temperature=2.0)
    with pytest.raises(InvalidValueError, match="objective"):
        fit_detection_temperature(pool, objective="ece")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="no detections"):
        fit_detection_temperature(pool, objective="nll", operating_point=OperatingPoint(score_threshold=1.0))


def test_exact_reach_of_the_t1_selection():
    pool = _pool(seed=3, images=2)
    t_max = pool.exact_up_to(0.3)
    assert t_max == pytest.approx(math.log(0.001 / 0.999) / math.log(0.3 / 0.7))
    assert pool.exact_up_to(0.5) == math.inf
    # below that T, cutting the pool gives what cutting every candidate would
    full = CandidatePool(head="sigmoid", background="none", num_classes=3, floor=0.0, max_candidates=10**6)
    for image in pool.images:
        full.images.append(image)
    rec_a, _ = detections_at(pool, 0.9 * t_max, POINT)
    assert rec_a.status.numel() > 0


def test_nms_per_t_for_softmax_heads():
    # two overlapping boxes of one class: which survives NMS depends on T for a softmax head
    pool = CandidatePool(head="softmax", background="last", num_classes=2, floor=0.0)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]])
    logits = torch.tensor([[8.0, 7.9, 0.0], [3.0, -3.0, 2.5]])
    gt = GroundTruth(torch.tensor([[1.0, 0, 11, 10]]), torch.tensor([0]), torch.tensor([False]))
    pool.add(Detections(boxes, logits, "softmax", "last"), gt, image_id=1, width=20, height=20)
    point = OperatingPoint(score_threshold=0.0, nms_iou=0.5)
    first = detections_at(pool, 1.0, point)[0]
    hot = detections_at(pool, 8.0, point)[0]
    s1 = torch.softmax(logits, 1)[:, 0]
    s8 = torch.softmax(logits / 8, 1)[:, 0]
    assert (s1[1] > s1[0]) and (s8[0] > s8[1])  # the order flips with T
    top1 = first.boxes[first.labels == 0][0]
    top8 = hot.boxes[hot.labels == 0][0]
    assert top1.tolist() == boxes[1].tolist() and top8.tolist() == boxes[0].tolist()


def test_sigmoid_pool_keeps_rows_only_above_the_threshold():
    full = _pool(seed=2)
    lean = CandidatePool(head="sigmoid", background="none", num_classes=3, row_threshold=POINT.score_threshold)
    for image in full.images:  # re-add the same candidates through add()
        det = Detections(image.boxes, image.logits, "sigmoid", "none")
        lean.add(det, image.target, image_id=image.image_id, width=image.width, height=image.height)
    assert sum(i.logits.shape[0] for i in lean.images) < sum(i.logits.shape[0] for i in full.images)
    a = fit_detection_temperature(full, objective="nll", operating_point=POINT, grid=4)
    b = fit_detection_temperature(lean, objective="nll", operating_point=POINT, grid=4)
    assert a.temperature == b.temperature and a.fit_samples == b.fit_samples
    assert [p.dece for p in a.sweep] == [p.dece for p in b.sweep]
    with pytest.raises(InvalidValueError, match="row_threshold"):
        fit_detection_temperature(lean, objective="nll", operating_point=OperatingPoint(score_threshold=0.05), grid=4)


@pytest.mark.parametrize("matching", ["greedy", "netcal"])
@pytest.mark.parametrize("nms_iou", [0.5, None])
def test_cut_once_sigmoid_path_equals_the_long_way(matching, nms_iou):
    from calibrate_teacher.detection.candidates import detections_at_reference

    pool = _pool(seed=8, images=10)
    point = OperatingPoint(score_threshold=0.3, max_detections=7, nms_iou=nms_iou, match_iou=0.5)
    for t in (0.3, 1.0, 1.7, 6.0):
        fast, cand_fast = detections_at(pool, t, point, matching=matching)
        slow, cand_slow = detections_at_reference(pool, t, point, matching=matching)
        # vectorised sigmoid may round the last bit differently by tensor length
        torch.testing.assert_close(fast.scores, slow.scores, atol=1e-15, rtol=0)
        for a, b in zip(
            (fast.labels, fast.status, fast.features, fast.image, fast.boxes, cand_fast),
            (slow.labels, slow.status, slow.features, slow.image, slow.boxes, cand_slow),
            strict=True,
        ):
            assert torch.equal(a, b)
        assert fast.scores.numel() > 0
