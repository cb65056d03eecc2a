"""Detection through the CLI (#14): evaluate, fit, bake and export-soft-labels on COCO data.

The example detector (``examples/detection``: an ultralytics-layout ONNX and a COCO folder,
copied into tmp_path) is run through the commands; the references are onnxruntime on the
original graph with its class Sigmoid's input added as an output (the true logits), and the
library calls themselves for the wiring tests (patched, asserting the keywords they received).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from calibrate_teacher import jobs
from calibrate_teacher.detection import bake as detection_bake
from calibrate_teacher.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detection"


@pytest.fixture
def example(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "detection", ignore=shutil.ignore_patterns("*.calibrated.*"))
    return tmp_path / "detection"


# --------------------------------------------------------------------------- references


def _logit_session(path: Path) -> ort.InferenceSession:
    """The model with the class Sigmoid's input (the logits [1, C, N]) added as an output."""
    model = onnx.load(str(path))
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(sigmoid.input[0]))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _images(example: Path, count: int = 4) -> tuple[list[int], np.ndarray]:
    """The first images as the model input (64 x 64 letterbox at 64 x 64: pixels / 255)."""
    doc = json.loads((example / "coco" / "annotations.json").read_text())
    entries = doc["images"][:count]
    arrays = [np.asarray(Image.open(example / "coco" / "images" / e["file_name"]).convert("RGB")) for e in entries]
    x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return [e["id"] for e in entries], x


def _run(session: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    outs = [session.run(None, {"images": x[i : i + 1]}) for i in range(len(x))]
    return np.concatenate([o[0] for o in outs]), (np.concatenate([o[1] for o in outs]) if len(outs[0]) > 1 else None)


def _check_baked(original: Path, baked: Path, t: float, x: np.ndarray) -> None:
    reference, logits = _run(_logit_session(original), x)
    out, _ = _run(ort.InferenceSession(str(baked), providers=["CPUExecutionProvider"]), x)
    assert np.array_equal(out[:, :4], reference[:, :4])  # boxes bit-identical
    expected = 1.0 / (1.0 + np.exp(-logits.astype(np.float64) / t))
    assert np.abs(out[:, 4:] - expected).max() < 1e-5
    assert np.abs(out[:, 4:] - reference[:, 4:]).max() > 1e-3  # T really changed the scores


# --------------------------------------------------------------------------- the commands


@pytest.mark.slow
def test_fit_json_report_and_baked_onnx(cli, example, tmp_path):
    report = tmp_path / "fit.json"
    code, out, err = cli("fit", example / "detector.onnx", "--data", example / "coco", "--json", "--report", report)
    assert code == 0, err
    doc = json.loads(out)
    assert doc == json.loads(report.read_text())
    assert doc["task"] == "detection" and doc["kind"] == "fit" and doc["objective"] == "dece"
    assert doc["head"] == "sigmoid" and doc["background"] == "none"
    assert 1.2 <= doc["temperature"] <= 4.0 and not doc["at_bound"]  # moderately over-confident
    assert doc["after"]["dece"] < doc["before"]["dece"] and doc["verdict"] in ("overconfident", "underconfident")
    assert doc["operating_point"] == {"score_threshold": 0.3, "max_detections": 100, "nms_iou": 0.5, "match_iou": 0.5}
    assert doc["data"]["preprocess"]["input_size"] == [64, 64]
    assert "the input size of detector.onnx, letterboxed" in doc["data"]["preprocess_from"]
    assert doc["data"]["preprocess_defaults"] == []
    assert doc["bounds"] == [0.1, 10.0] and len(doc["sweep"]) == 34  # the detection defaults (32 + 1, 1.5)
    baked = example / "detector.calibrated.onnx"
    assert doc["baked"]["path"] == str(baked) and baked.is_file()
    assert "operating point not given" in err and "baked detector written" in err
    _check_baked(example / "detector.onnx", baked, doc["temperature"], _images(example)[1])
    # the baked file is not replaced without --overwrite
    code, _, err = cli("fit", example / "detector.onnx", "--data", example / "coco", "--temperature", "2")
    assert code == 1 and "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_fit_human_output_with_flags(cli, example):
    code, out, err = cli(
        "fit", example / "detector.onnx", "--data", example / "coco" / "annotations.json", "--images",
        example / "coco" / "images", "--objective", "nll", "--score-threshold", "0.25", "--no-bake",
    )  # fmt: skip
    assert code == 0, err
    assert "Before and after temperature scaling" in out and "Sweep over" in out and "D-ECE" in out
    assert "score >= 0.25" in out and "mAP@0.5" in out and "T = " in out
    assert "max_detections, nms_iou, match_iou not given" in err
    assert not (example / "detector.calibrated.onnx").exists()


def test_evaluate_json_equals_the_library(cli, example):
    code, out, err = cli(
        "evaluate", example / "detector.onnx", "--data", example / "coco", "--json", "--temperature", "2",
        "--match-iou", "0.4", "--matching", "netcal", "--n-bins", "10",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["task"] == "detection" and doc["kind"] == "evaluation" and doc["temperature"] == 2.0
    run = jobs.evaluate_detector(
        example / "detector.onnx", example / "coco", temperature=2.0, operating_point={"match_iou": 0.4},
        matching="netcal", n_bins=10,
    )  # fmt: skip
    assert doc["metrics"] == json.loads(json.dumps(run.report.to_json()))
    assert doc["operating_point"]["match_iou"] == 0.4


@pytest.mark.slow
def test_bake_detection_onnx(cli, example):
    out_path = example / "t25.onnx"
    code, out, err = cli("bake", example / "detector.onnx", "-t", "2.5", "--out", out_path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["path"] == str(out_path) and doc["boxes_identical"] and doc["max_abs_error"] <= doc["tolerance"]
    assert "random" in err  # checked on seeded random images without data: said so
    _check_baked(example / "detector.onnx", out_path, 2.5, _images(example)[1])
    meta = {p.key: p.value for p in onnx.load(str(out_path)).metadata_props}
    assert meta["calibrate_teacher.temperature"] == "2.5" and meta["task"] == "detect"
    code, out, _ = cli("bake", example / "detector.onnx", "-t", "2.5", "--out", out_path, "--overwrite")
    assert code == 0 and "Baked detector" in out and "bit-identical" in out


@pytest.mark.slow
def test_bake_state_dict_with_arch(cli, tmp_path):
    import _detection_fixtures as dfx
    from safetensors.torch import load_file

    fx = dfx.shared(tmp_path)
    out_path = tmp_path / "dense.t17.safetensors"
    code, out, err = cli(
        "bake", fx.dense_weights, "-t", "1.7", "--arch", fx.dense_arch, "--detection-head", "sigmoid",
        "--out", out_path, "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    layer = "head.classification_head.cls_logits"
    assert sorted(doc["changed"]) == [f"{layer}.bias", f"{layer}.weight"]
    before, after = load_file(fx.dense_weights), load_file(out_path)
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith(layer):
            assert torch.allclose(after[key].double(), before[key].double() / 1.7, rtol=1e-6, atol=0)
        else:
            assert torch.equal(after[key], before[key])


@pytest.mark.slow
def test_export_soft_labels_to_a_detection_cache(cli, example, tmp_path):
    from calibrate_teacher.detection import open_detection_cache

    report = tmp_path / "fit.json"
    code, _, err = cli("fit", example / "detector.onnx", "--data", example / "coco", "--no-bake", "--report", report)
    assert code == 0, err
    t = json.loads(report.read_text())["temperature"]
    cache_dir = tmp_path / "cache"
    code, out, err = cli(
        "export-soft-labels", example / "detector.onnx", "--data", example / "coco", "--out", cache_dir,
        "--from-report", report, "--top-candidates", "20", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["task"] == "detection" and doc["kind"] == "soft_labels"
    assert doc["cache"]["temperature"] == t and doc["cache"]["num_images"] == 80
    cache = open_detection_cache(cache_dir, verify=True)
    ids, x = _images(example, 3)
    _, logits = _run(_logit_session(example / "detector.onnx"), x)
    for image_id, z in zip(ids, logits, strict=True):
        z = z.T.astype(np.float64)  # [N, C]
        top = np.argsort(-z.max(axis=1), kind="stable")[:20]
        row = cache[image_id]
        got = np.asarray(row.logits, dtype=np.float64)
        order = np.argsort(-got.max(axis=1), kind="stable")
        assert got.shape == (20, 3)
        assert np.abs(got[order] - z[top] / t).max() < 1e-5
    # a second export into the same folder fails at once, one line
    code, _, err = cli("export-soft-labels", example / "detector.onnx", "--data", example / "coco", "--out", cache_dir,
                       "-t", "2")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- errors


def test_missing_images_folder_is_one_line(cli, example):
    code, _, err = cli(
        "evaluate", example / "detector.onnx", "--data", example / "coco" / "annotations.json", "--images",
        example / "nowhere",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error (bad input)") and "nowhere" in err


def test_json_naming_a_missing_image_is_one_line(cli, example):
    path = example / "coco" / "annotations.json"
    doc = json.loads(path.read_text())
    doc["images"][3]["file_name"] = "missing.png"
    path.write_text(json.dumps(doc))
    code, _, err = cli("evaluate", example / "detector.onnx", "--data", example / "coco")
    lines = [line for line in err.strip().splitlines() if line.startswith("Error")]
    assert code == 1 and "Traceback" not in err and len(lines) == 1 and "missing.png" in lines[0]
    assert "--skip-bad" in lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["--matching", "hungarian"],
        ["--score-threshold", "1.5"],
        ["--max-detections", "0"],
        ["--nms-iou", "-0.1"],
        ["--background", "middle"],
        ["--detection-head", "relu"],
        ["--objective", "adaece"],
        ["--diagram", "rel.png"],
        ["--logits", "val.safetensors"],
    ],
)
def test_bad_option_values_exit_2(cli, example, args):
    code, _, err = cli("fit", example / "detector.onnx", "--data", example / "coco", *args)
    assert code == 2, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- the CLI passes what it parsed


class _Stop(InputError):
    pass


def _capture(monkeypatch, module, name):
    seen: dict[str, object] = {}

    def fake(*args, **kwargs):
        seen.update(args=args, **kwargs)
        raise _Stop("stopped by the test")

    monkeypatch.setattr(module, name, fake)
    return seen


def test_fit_passes_options_to_the_library(cli, example, monkeypatch):
    seen = _capture(monkeypatch, jobs, "calibrate_detector")
    code, _, err = cli(
        "fit", "t.onnx", "--data", example / "coco", "--images", example / "coco" / "images", "--score-threshold",
        "0.2", "--max-detections", "50", "--nms-iou", "0.6", "--matching", "netcal", "--background", "none",
        "--detection-head", "sigmoid", "--objective", "nll", "--out", "b.onnx", "--overwrite", "--device", "cpu",
        "--batch-size", "4", "--input-size", "3,96,96",
    )  # fmt: skip
    assert code == 1 and "stopped by the test" in err
    teacher, data = seen["args"]
    assert teacher.path == Path("t.onnx") and teacher.device == "cpu"
    assert data.path == example / "coco" and data.batch_size == 4 and data.overrides == {"input_size": (3, 96, 96)}
    opts = seen["options"]
    assert opts.images == example / "coco" / "images" and opts.head == "sigmoid" and opts.background == "none"
    assert seen["operating_point"] == {"score_threshold": 0.2, "max_detections": 50, "nms_iou": 0.6}
    assert seen["matching"] == "netcal" and seen["objective"] == "nll" and seen["temperature"] is None
    assert seen["bounds"] == (0.1, 10.0) and seen["grid"] == 32 and seen["n_bins"] == 20  # detection defaults
    assert seen["bake"] is True and seen["out"] == Path("b.onnx") and seen["overwrite"] is True
    code, _, _ = cli("fit", "t.onnx", "--data", example / "coco", "-t", "1.5", "--n-bins", "15", "--bounds", "0.5",
                     "5", "--grid", "8", "--no-bake")
    assert code == 1
    assert seen["objective"] == "fixed" and seen["temperature"] == 1.5 and seen["operating_point"] is None
    assert seen["n_bins"] == 15 and seen["bounds"] == (0.5, 5.0) and seen["grid"] == 8 and seen["bake"] is False


def test_evaluate_and_export_pass_options(cli, example, monkeypatch):
    seen = _capture(monkeypatch, jobs, "evaluate_detector")
    code, _, _ = cli("evaluate", "t.onnx", "--data", example / "coco", "-t", "1.3", "--class-layer", "cls", "--arch",
                     "m.py:f")
    assert code == 1
    assert seen["temperature"] == 1.3 and seen["n_bins"] == 20 and seen["options"].class_layer == "cls"
    assert seen["args"][0].arch == "m.py:f"
    seen = _capture(monkeypatch, jobs, "export_detector_soft_labels")
    code, _, _ = cli("export-soft-labels", "t.onnx", "--data", example / "coco", "--out", "c", "-t", "2",
                     "--top-candidates", "7", "--top-k", "2", "--shard-rows", "16")
    assert code == 1
    assert seen["args"][2] == Path("c") and seen["temperature"] == 2.0 and seen["top_candidates"] == 7
    assert seen["top_k"] == 2 and seen["shard_images"] == 16


def test_bake_routes_a_state_dict_by_its_detection_flags(cli, monkeypatch):
    seen = _capture(monkeypatch, detection_bake, "bake_detector_temperature")
    code, _, err = cli("bake", "w.safetensors", "-t", "1.6", "--arch", "m.py:f", "--detection-head", "softmax",
                       "--background", "last", "--class-layer", "roi.cls", "--out", "o.safetensors")
    assert code == 1 and "stopped by the test" in err
    assert seen["args"] == (Path("w.safetensors"), 1.6) and seen["out"] == Path("o.safetensors")
    assert seen["arch"] == "m.py:f" and seen["head"] == "softmax" and seen["background"] == "last"
    assert seen["class_layer"] == "roi.cls" and seen["overwrite"] is False


def test_help_lists_the_detection_panel(cli):
    code, out, _ = cli("fit", "--help")
    assert code == 0 and "Detection" in out and "--score-threshold" in out and "--images" in out


def test_preprocessing_comes_from_the_sidecar_and_flags_win(cli, example):
    (example / "detector.preprocess.json").write_text(json.dumps({"mode": "letterbox", "input_size": [64, 64]}))
    code, out, err = cli("evaluate", example / "detector.onnx", "--data", example / "coco", "--json")
    assert code == 0, err
    data = json.loads(out)["data"]
    assert data["preprocess_from"] == f"{example / 'detector.preprocess.json'} beside the model"
    assert data["preprocess_defaults"] == []
    code, out, err = cli("evaluate", example / "detector.onnx", "--data", example / "coco", "--json",
                         "--input-size", "3,64,64")
    assert code == 0, err
    assert json.loads(out)["data"]["preprocess_from"].endswith("with input_size given")
    code, _, err = cli("evaluate", example / "detector.onnx", "--data", example / "coco", "--crop-pct", "0.9")
    assert code == 1 and "classification preprocessing" in err and "Traceback" not in err


def test_a_partial_operating_point_is_checked_and_noted(example):
    from calibrate_teacher.errors import InvalidValueError
    from calibrate_teacher.jobs._detection_inputs import operating_point_of

    point, notes = operating_point_of({"score_threshold": 0.2})
    assert point.score_threshold == 0.2 and point.max_detections == 100
    assert notes and "max_detections, nms_iou, match_iou not given" in notes[0]
    with pytest.raises(InvalidValueError, match="score_threshold"):
        jobs.evaluate_detector(example / "detector.onnx", example / "coco", operating_point={"score_threshold": 2})
    with pytest.raises(InvalidValueError, match="unknown key"):
        operating_point_of({"iou": 0.5})


@pytest.mark.slow
def test_example_generator_writes_a_detector_the_cli_reads(cli, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "det"
    done = subprocess.run([sys.executable, str(EXAMPLE.parent / "make_detection_teacher.py"), "--out", str(out),
                           "--steps", "15"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((out / "coco" / "images").glob("*.png"))) == 80
    again = subprocess.run([sys.executable, str(EXAMPLE.parent / "make_detection_teacher.py"), "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # nothing replaced silently
    code, out_text, err = cli("evaluate", out / "detector.onnx", "--data", out / "coco", "--json")
    assert code == 0, err
    assert json.loads(out_text)["teacher"]["classes"] == ["square", "disc", "bar"]


@pytest.mark.slow
def test_fit_a_two_stage_state_dict_bakes_its_class_layer(cli, tmp_path):
    import _detection_fixtures as dfx
    from safetensors import safe_open
    from safetensors.torch import load_file

    fx = dfx.shared(tmp_path)
    out_path = tmp_path / "two.calibrated.safetensors"
    code, out, err = cli(
        "fit", fx.two_stage_weights, "--arch", fx.two_stage_arch, "--arch-kwargs", '{"layout": "torchvision"}',
        "--data", fx.annotations, "--images", fx.images_dir, "--input-size", "3,64,64", "--objective", "nll",
        "--out", out_path, "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["head"] == "softmax" and doc["background"] == "first" and doc["objective"] == "nll"
    t = doc["temperature"]
    layer = "roi_heads.box_predictor.cls_score"
    assert sorted(doc["baked"]["changed"]) == [f"{layer}.bias", f"{layer}.weight"]
    before, after = load_file(fx.two_stage_weights), load_file(out_path)
    for key in before:
        if key.startswith(layer):
            assert torch.allclose(after[key].double(), before[key].double() / t, rtol=1e-6, atol=0)
        else:
            assert torch.equal(after[key], before[key])  # box regression and the RPN untouched
    with safe_open(str(out_path), "pt") as fh:
        assert float(fh.metadata()["calibrate_teacher.temperature"]) == pytest.approx(t, rel=1e-12)
    assert "input_size given" in doc["data"]["preprocess_from"]
