"""`Calibration.from_report` checks the report's teacher and preprocessing (issue #10, item 6).

The JSON paths read are pinned here: ``source.teacher.sha256``, ``source.teacher.format``
(``source.teacher.path`` for messages), ``source.data.preprocess``, and ``baked.sha256``.
"""

from __future__ import annotations

import json

import _teacher_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from calibrate_teacher._io import sha256_file
from calibrate_teacher.errors import InputError
from calibrate_teacher.soft_labels import Calibration

SHA_A, SHA_B, SHA_BAKED = "a1" * 32, "b2" * 32, "c3" * 32
PREPROCESS = {
    "input_size": [3, 8, 8],
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.5, 0.4, 0.3],
    "std": [0.25, 0.2, 0.3],
}
TEACHER_A = {"file": "teacher.onnx", "sha256": SHA_A, "format": "onnx"}


def _report(tmp_path, *, teacher=None, preprocess=None, baked=None, name="fit.json"):
    source = {"num_samples": 10, "num_classes": 5}
    if teacher is not None:
        source["teacher"] = teacher
    if preprocess is not None:
        source["data"] = {"kind": "image_folder", "path": "val", "preprocess": preprocess}
    doc = {"kind": "fit", "temperature": 1.8, "objective": "ece", "after": {"ece": 0.01}, "source": source}
    if baked is not None:
        doc["baked"] = baked
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_report_of_the_same_teacher_passes_and_keeps_the_manifest_block(tmp_path):
    path = _report(tmp_path, teacher={"path": "models/teacher.onnx", "format": "onnx", "sha256": SHA_A},
                   preprocess=PREPROCESS)
    cal = Calibration.from_report(path, teacher=TEACHER_A, preprocess=dict(PREPROCESS))
    assert cal.warnings == ()
    assert cal == Calibration(1.8, "fit", "ece", {"ece": 0.01}, "fit.json")  # the new fields do not compare
    assert cal.to_json() == Calibration(1.8, "fit", "ece", {"ece": 0.01}, "fit.json").to_json()
    assert cal.report_teacher == {"path": "models/teacher.onnx", "format": "onnx", "sha256": SHA_A}
    assert cal.report_preprocess == PREPROCESS
    assert Calibration.from_report(path).warnings == ()  # no teacher given: nothing checked


def test_report_of_another_teacher_is_refused_naming_both(tmp_path):
    path = _report(tmp_path, teacher={"path": "models/teacher.onnx", "format": "onnx", "sha256": SHA_A})
    other = {"file": "student_teacher.onnx", "sha256": SHA_B, "format": "onnx"}
    with pytest.raises(InputError) as err:
        Calibration.from_report(path, teacher=other)
    message = str(err.value)
    assert "\n" not in message and message.startswith("fit.json: fitted for teacher teacher.onnx")
    assert SHA_A[:12] in message and SHA_B[:12] in message and "student_teacher.onnx" in message
    assert "--force" in message
    forced = Calibration.from_report(path, teacher=other, force=True)
    assert forced.temperature == 1.8
    assert len(forced.warnings) == 1 and forced.warnings[0].startswith("forced: fit.json: fitted for")


def test_format_mismatch_is_refused_and_a_missing_sha256_is_a_warning(tmp_path):
    path = _report(tmp_path, teacher={"path": "teacher.onnx", "format": "onnx"})  # an older report
    with pytest.raises(InputError, match="torchscript"):
        Calibration.from_report(path, teacher={"file": "teacher.pt", "sha256": SHA_A, "format": "torchscript"})
    (warning,) = Calibration.from_report(path, teacher=TEACHER_A).warnings
    assert "only the format was compared" in warning and "source.teacher.sha256" in warning


def test_report_without_a_teacher_cannot_be_checked(tmp_path):
    path = _report(tmp_path)  # `fit --logits`: no teacher recorded
    (warning,) = Calibration.from_report(path, teacher=TEACHER_A).warnings
    assert "nothing could be compared" in warning and "teacher.onnx" in warning


def test_exporting_the_baked_teacher_is_refused(tmp_path):
    path = _report(tmp_path, teacher={"path": "teacher.onnx", "format": "onnx", "sha256": SHA_A},
                   baked={"path": "teacher.calibrated.onnx", "sha256": SHA_BAKED})
    baked = {"file": "teacher.calibrated.onnx", "sha256": SHA_BAKED, "format": "onnx"}
    with pytest.raises(InputError, match=r"already logits / 1\.8.*--temperature 1"):
        Calibration.from_report(path, teacher=baked)


def test_teacher_given_as_a_file_is_hashed(tmp_path):
    model = tmp_path / "teacher.bin"
    model.write_bytes(b"weights")
    path = _report(tmp_path, teacher={"path": "teacher.bin", "format": "onnx", "sha256": sha256_file(model)})
    assert Calibration.from_report(path, teacher=model).warnings == ()
    model.write_bytes(b"other weights")
    with pytest.raises(InputError, match=r"teacher\.bin"):
        Calibration.from_report(path, teacher=model)


def test_other_preprocessing_is_a_warning_naming_the_keys(tmp_path):
    path = _report(tmp_path, teacher={"sha256": SHA_A}, preprocess=PREPROCESS)
    same = {**PREPROCESS, "mean": (0.5, 0.4, 0.30000000000000004), "input_size": (3, 8, 8)}
    assert Calibration.from_report(path, preprocess=same).warnings == ()
    changed = {**PREPROCESS, "crop_pct": 1.0, "interpolation": "bicubic"}
    (warning,) = Calibration.from_report(path, teacher=TEACHER_A, preprocess=changed).warnings
    assert "interpolation bilinear, crop_pct 0.875" in warning
    assert "interpolation bicubic, crop_pct 1" in warning and "mean" not in warning
    cal = Calibration.from_report(path)  # or check once the data is open
    assert cal.check_preprocess(PREPROCESS) == ()
    assert "stored arrays" in cal.check_preprocess(None)[0]
    no_preprocess = Calibration.from_report(_report(tmp_path, name="logits-fit.json"))
    assert "records no preprocessing" in no_preprocess.check_preprocess(PREPROCESS)[0]
    assert no_preprocess.check_preprocess(None) == ()


def test_fixed_temperature_checks_nothing():
    assert Calibration(1.5).check_teacher(TEACHER_A) == ()
    assert Calibration(1.5).check_preprocess(PREPROCESS) == ()


@pytest.mark.parametrize(
    ("source", "where"),
    [("val", "'source'"), ({"teacher": "teacher.onnx"}, "source.teacher"),
     ({"data": {"preprocess": [1, 2]}}, "source.data.preprocess"),
     ({"teacher": {"sha256": 7}}, "'sha256'")],
)
def test_malformed_source_is_an_input_error(tmp_path, source, where):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"temperature": 1.5, "source": source}))
    with pytest.raises(InputError, match=where):
        Calibration.from_report(path)


def test_a_real_fit_report_records_what_is_checked(tmp_path, cli):
    teacher = fx.save_torchscript(fx.tiny_conv(), tmp_path / "teacher.pt")
    preprocess = tmp_path / "preprocess.json"
    preprocess.write_text(json.dumps(PREPROCESS))
    rng = np.random.default_rng(0)
    for c in range(5):
        (tmp_path / "val" / str(c)).mkdir(parents=True)
        for j in range(3):
            pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / str(c) / f"{j}.png")
    report = tmp_path / "fit.json"
    code, _, err = cli("fit", teacher, "--data", tmp_path / "val", "--preprocess", preprocess, "--report", report,
                       "--no-bake", "--bootstrap", "0", "--device", "cpu")
    assert code == 0, err
    source = json.loads(report.read_text())["source"]
    assert source["teacher"]["format"] == "torchscript"
    assert source["teacher"]["sha256"] == sha256_file(teacher)
    assert source["data"]["preprocess"] == PREPROCESS
    identity = {"file": "teacher.pt", "sha256": sha256_file(teacher), "format": "torchscript"}
    assert Calibration.from_report(report, teacher=identity, preprocess=PREPROCESS).warnings == ()
    with pytest.raises(InputError, match=r"fitted for teacher teacher\.pt"):
        Calibration.from_report(report, teacher={**identity, "sha256": SHA_B})
