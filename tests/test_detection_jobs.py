"""The detection jobs (#14): evaluate_detector / calibrate_detector on COCO folders and fake teachers."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch
from _coco_fixtures import CLASS_NAMES, FakeDetector, standard_images, write_coco
from rich.console import Console

from calibrate_teacher.detection.base import DetectionTeacher, OperatingPoint
from calibrate_teacher.detection.coco import open_coco
from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.jobs._detection import calibrate_detector, evaluate_detector

LB64 = {"mode": "letterbox", "input_size": [64, 64]}
POINT = OperatingPoint(score_threshold=0.3, max_detections=100, nms_iou=0.5, match_iou=0.5)


@pytest.fixture
def coco(tmp_path):
    write_coco(tmp_path, standard_images())
    return tmp_path


def _source(coco, **kw):
    return open_coco(coco / "instances.json", classes=CLASS_NAMES, preprocess=LB64, **kw)


def _render(table):
    console = Console(file=io.StringIO(), width=150)
    console.print(table)
    return console.file.getvalue()


def test_fake_detector_is_a_detection_teacher():
    assert isinstance(FakeDetector(), DetectionTeacher)


def test_evaluate_counts_known_by_construction(coco):
    # 5 objects, 1 of them a crowd region; each found object also has a shifted copy (NMS removes
    # it), and every image has one distractor (an FP). Logits 3, 2, 1 pass 0.3; the distractor 1.5.
    run = evaluate_detector(FakeDetector(), _source(coco), operating_point=POINT)
    rep = run.report
    assert (rep.num_images, rep.num_gt) == (4, 4)
    assert rep.num_tp == 4 and rep.num_fp == 4 and rep.num_ignored == 1
    assert rep.num_detections == 9
    # D-ECE by hand: confidences sigma(3), sigma(2), sigma(1) are TPs; sigma(1.5) x 4 are FPs
    s = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 1.5], dtype=torch.float64)).tolist()
    # 20 bins: sigma(3) = .953 in bin 19 (two red TPs), sigma(2) = .881 in 17 (green), .731 in 14 (blue),
    # .818 in 16 (the four FPs)
    expected = (2 * (1 - s[0]) + (1 - s[1]) + (1 - s[2]) + 4 * s[3]) / 8
    assert rep.dece.dece == pytest.approx(expected, abs=1e-12)
    assert rep.map.map50 == pytest.approx(1.0) and rep.map.map is not None
    doc = run.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["task"] == "detection" and doc["kind"] == "evaluation" and doc["head"] == "sigmoid"
    assert doc["operating_point"] == POINT.to_json() and doc["background"] == "none"
    assert doc["metrics"]["num_tp"] == 4 and "dece" in doc["definitions"]
    assert doc["candidates"]["selected_at_temperature"] == 1.0
    text = _render(run.table())
    assert "D-ECE" in text and "mAP@0.5" in text and "score >= 0.3" in text


def test_map_matches_pycocotools_on_the_same_dicts(coco):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from calibrate_teacher.detection.candidates import CandidatePool, coco_results, detections_at
    from calibrate_teacher.detection.metrics import coco_map

    src = _source(coco)
    teacher = FakeDetector(hit_logit=(0.2, -0.5, 1.0), distractor_logit=0.9)
    run = evaluate_detector(teacher, src, operating_point=POINT)
    # rebuild the same detections and score them with pycocotools directly
    pool = CandidatePool(head="sigmoid", background="none", num_classes=3)
    from calibrate_teacher.detection.base import to_original

    for batch in src.batches(batch_size=4):
        for det, t, gt, i in zip(
            teacher.detect(batch.images), batch.transforms, batch.targets, batch.image_ids, strict=True
        ):
            pool.add(to_original(det, t), gt, image_id=i, width=t.width, height=t.height)
    rec, _ = detections_at(pool, 1.0, POINT)
    results, _ = coco_results(pool, rec, src.category_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = src.coco_ground_truth()
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert run.report.map.map == ev.stats[0] and run.report.map.map50 == ev.stats[1]
    assert coco_map(src.coco_ground_truth(), results).map == ev.stats[0]


def test_temperature_moves_the_threshold(coco):
    # blue at sigma(-1.2) = 0.23 misses 0.3 at T = 1, and passes at T = 3 (sigma(-0.4) = 0.40)
    teacher = FakeDetector(hit_logit=(3.0, 2.0, -1.2))
    t1 = evaluate_detector(teacher, _source(coco), operating_point=POINT).report
    t3 = evaluate_detector(teacher, _source(coco), operating_point=POINT, temperature=3.0).report
    assert t1.num_tp == 3 and t3.num_tp == 4
    assert t3.temperature == 3.0 and t3.recall > t1.recall and t3.map.map50 > t1.map.map50


def test_calibrate_nll_and_dece(coco):
    teacher = FakeDetector(hit_logit=(6.0, 5.0, 4.0), distractor_logit=4.5)  # overconfident
    run = calibrate_detector(teacher, _source(coco), objective="nll", operating_point=POINT)
    assert run.fit.temperature > 1.0 and run.after.temperature == run.fit.temperature
    assert run.before.temperature == 1.0
    doc = run.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["task"] == "detection" and doc["kind"] == "fit" and doc["objective"] == "nll"
    assert {"before", "after", "sweep", "temperature", "operating_point", "paper"} <= set(doc)
    assert doc["before"]["map50"] is not None and doc["after"]["map50"] is not None
    temps = [p["temperature"] for p in doc["sweep"]]
    assert 1.0 in temps and 1.5 in temps
    run = calibrate_detector(teacher, _source(coco), objective="dece", operating_point=POINT, grid=8)
    assert run.after.dece.dece <= run.before.dece.dece
    assert run.fit.objective_value == pytest.approx(run.after.dece.dece, abs=1e-12)
    assert "chosen T" in _render(run.sweep_table()) and "after" in _render(run.table())


@pytest.mark.parametrize("background", ["first", "last"])
def test_softmax_teacher(coco, background):
    teacher = FakeDetector(head="softmax", background=background, hit_logit=(5.0, 4.0, 3.0), distractor_logit=2.0)
    run = evaluate_detector(teacher, _source(coco, background=background), operating_point=POINT)
    assert run.report.num_tp == 4 and run.to_json()["background"] == background
    fit = calibrate_detector(teacher, _source(coco), objective="nll", operating_point=POINT).fit
    assert fit.head == "softmax" and fit.fit_samples == 8


def test_model_nms_and_netcal_matching(coco):
    teacher = FakeDetector(nms_applied=True)  # its "NMS" left the duplicates in
    run = evaluate_detector(teacher, _source(coco), operating_point=POINT)
    assert run.report.num_fp == 4 + 4  # duplicates of the 4 TPs are FPs under one-to-one matching
    assert any("applies NMS itself" in n for n in run.notes)
    many = evaluate_detector(teacher, _source(coco), operating_point=POINT, matching="netcal").report
    assert many.num_tp == 8 and many.matching == "netcal"


def test_defaults_are_noted(coco):
    run = evaluate_detector(FakeDetector(), coco / "instances.json")  # a path: opened with the teacher's names
    assert any("operating point not given" in n for n in run.notes)
    assert any("preprocessing" in n for n in run.notes)
    assert run.data["classes_from"] == "the teacher's class names"


def test_mismatches_are_errors(coco):
    with pytest.raises(InputError, match="maps 3 classes"):
        evaluate_detector(FakeDetector(num_classes=4, class_names=None), _source(coco))
    with pytest.raises(InvalidValueError, match="background"):
        evaluate_detector(FakeDetector(), _source(coco, background="first"))
    with pytest.raises(InvalidValueError, match="detection teacher"):
        evaluate_detector(object(), _source(coco))  # type: ignore[arg-type]


def test_map_is_null_without_pycocotools(coco, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    doc = evaluate_detector(FakeDetector(), _source(coco), operating_point=POINT).to_json()
    assert doc["metrics"]["map"] is None and doc["metrics"]["map50"] is None
    assert "pip install 'calibrate-teacher[detection]'" in doc["metrics"]["map_note"]
    assert doc["metrics"]["dece"] > 0


def test_max_candidates_cap_is_noted(coco):
    run = evaluate_detector(FakeDetector(), _source(coco), operating_point=POINT, max_candidates=2)
    assert run.candidates["capped_images"] >= 1 and any("max_candidates=2" in n for n in run.notes)


@pytest.mark.slow
def test_trained_fixture_detectors_end_to_end(tmp_path_factory):
    # H-det-b's trained tiny detector: its ultralytics ONNX export and its state dict are the same
    # model, so the whole pipeline (letterbox, detect, pool, NMS, matching, D-ECE, mAP, fit) must agree.
    import _detection_fixtures as dfx

    from calibrate_teacher.detection.load import load_detection_teacher

    fx = dfx.shared(tmp_path_factory.getbasetemp())
    point = OperatingPoint(score_threshold=0.05, max_detections=100, nms_iou=0.5, match_iou=0.5)
    runs = []
    for path, kw in ((fx.onnx, {}), (fx.dense_weights, {"arch": fx.dense_arch})):
        teacher = load_detection_teacher(path, **kw)
        src = open_coco(
            fx.annotations,
            images=fx.images_dir,
            classes=dfx.CLASS_NAMES,
            background=teacher.background,
            preprocess={"mode": "letterbox", "input_size": [dfx.SIZE, dfx.SIZE]},
        )
        runs.append(calibrate_detector(teacher, src, objective="nll", operating_point=point, batch_size=1))
    a, b = runs
    assert a.before.num_tp == b.before.num_tp > 0 and a.before.num_fp == b.before.num_fp
    assert a.before.dece.dece == pytest.approx(b.before.dece.dece, abs=1e-5)
    assert a.fit.temperature == pytest.approx(b.fit.temperature, rel=1e-4)
    assert a.after.dece.dece < a.before.dece.dece  # the fixture is over-confident
    json.dumps(a.to_json(), allow_nan=False)
