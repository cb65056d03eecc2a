import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibrate_teacher import LogitSet, load_logits


@pytest.fixture
def logit_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    logits = 3 * torch.randn(400, 5, generator=g) + 4 * torch.nn.functional.one_hot(labels, 5)
    path = tmp_path / "val.safetensors"
    LogitSet(logits, labels).save(path)
    return path


def test_evaluate_json_is_one_document(cli, logit_file):
    code, out, err = cli("evaluate", "--logits", str(logit_file), "--json", "--bootstrap", "20")
    assert code == 0, err
    doc = json.loads(out)
    ls = load_logits(logit_file)
    from calibrate_teacher.metrics import calibration_metrics

    expected = calibration_metrics(ls.logits, ls.labels, bootstrap=20)
    assert doc["metrics"]["ece"] == expected.ece
    assert doc["metrics"]["confidence_intervals"]["ece"] == list(expected.confidence_intervals["ece"])
    assert doc["kind"] == "evaluation" and "ace" in doc["definitions"]


def test_fit_json_top_level_and_report_file(cli, logit_file, tmp_path):
    report = tmp_path / "fit.json"
    code, out, err = cli("fit", "--logits", str(logit_file), "--objective", "nll", "--json",
                         "--report", str(report), "--bootstrap", "0")
    assert code == 0, err
    doc = json.loads(out)
    assert {"temperature", "objective", "before", "after", "sweep", "definitions"} <= set(doc)
    keys = {"accuracy", "nll", "brier", "ece", "ece_over", "ece_under", "mce", "adaece", "ace", "tace",
            "classwise_ece"}
    assert keys <= set(doc["before"]) and keys <= set(doc["after"])
    assert doc["objective"] == "nll" and doc["after"]["nll"] <= doc["before"]["nll"]
    assert json.loads(report.read_text()) == doc


def test_fit_human_output_and_fixed_temperature(cli, logit_file):
    code, out, err = cli("fit", "--logits", str(logit_file), "--temperature", "1.5", "--bootstrap", "0")
    assert code == 0, err
    assert "T = 1.5000" in out and "robust range" in out and "Before and after" in out


def test_existing_report_is_not_overwritten(cli, logit_file, tmp_path):
    report = tmp_path / "r.json"
    report.write_text("keep me")
    code, _, err = cli("evaluate", "--logits", str(logit_file), "--report", str(report))
    assert code == 1 and report.read_text() == "keep me"
    assert err.strip().count("\n") == 0 and "already exists" in err and "--overwrite" in err
    code, _, err = cli("evaluate", "--logits", str(logit_file), "--report", str(report), "--overwrite")
    assert code == 0 and json.loads(report.read_text())["kind"] == "evaluation"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"garbage", "cannot be read"), (None, "no such file")],
)
def test_bad_logit_file_is_one_line_exit_1(cli, tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    code, out, err = cli("fit", "--logits", str(path))
    assert code == 1 and out == ""
    assert message in err and str(path) in err
    assert "Traceback" not in err and err.strip().count("\n") == 0


def test_usage_errors_exit_2(cli, logit_file):
    assert cli("fit", "--logits", str(logit_file), "--objective", "brier")[0] == 2
    assert cli("fit", "--logits", str(logit_file), "--n-bins", "0")[0] == 2
    assert cli("evaluate", "--no-such-flag")[0] == 2
    assert cli("fit", "--logits", str(logit_file), "--out", "x.onnx")[0] == 2


def test_neither_or_both_sources_is_an_error(cli, logit_file, tmp_path):
    code, _, err = cli("fit")
    assert code == 1 and "exactly one of --logits" in err
    code, _, err = cli("evaluate", "--logits", str(logit_file), "--data", str(tmp_path))
    assert code == 1 and "exactly one of --logits" in err


def test_fit_passes_options_to_the_library(cli, logit_file, monkeypatch):
    import calibrate_teacher.jobs as jobs

    seen = {}
    original = jobs.calibrate

    def spy(teacher, data, **kwargs):
        seen.update(kwargs, teacher=teacher, data=data)
        return original(teacher, data, **kwargs)

    monkeypatch.setattr(jobs, "calibrate", spy)
    code, _, err = cli("fit", "--logits", str(logit_file), "--objective", "adaece", "--bounds", "0.5", "4",
                       "--n-bins", "10", "--grid", "8", "--bootstrap", "5", "--seed", "7", "--json")
    assert code == 0, err
    assert seen["teacher"] is None and seen["data"] is None and seen["logits"] == logit_file
    assert seen["objective"] == "adaece" and seen["bounds"] == (0.5, 4.0)
    assert (seen["n_bins"], seen["grid"], seen["bootstrap"], seen["seed"]) == (10, 8, 5, 7)
    assert seen["bake"] is True and seen["out"] is None  # nothing to bake without a TEACHER file


def _subprocess(*args, env=None):
    return subprocess.run([sys.executable, "-m", "calibrate_teacher", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_debug_env_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"zz")
    quiet = _subprocess("evaluate", "--logits", str(bad))
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    loud = _subprocess("evaluate", "--logits", str(bad), env={"CALIBRATE_TEACHER_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_help_imports_no_heavy_package():
    code = (
        "import sys; from calibrate_teacher.cli import app; import calibrate_teacher;"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'safetensors', 'matplotlib', 'PIL')"
        " if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
    assert _subprocess("--help").returncode == 0


def test_public_api_resolves_every_name():
    import calibrate_teacher

    for name in calibrate_teacher.__all__:
        assert getattr(calibrate_teacher, name) is not None, name
    assert set(calibrate_teacher._LAZY) <= set(calibrate_teacher.__all__)


def test_reliability_diagram_png(cli, logit_file, tmp_path):
    png = tmp_path / "rel.png"
    code, _, err = cli("fit", "--logits", logit_file, "--diagram", png, "--bootstrap", "0")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = cli("evaluate", "--logits", logit_file, "--diagram", png)
    assert code == 1 and "already exists" in err


def test_diagram_without_matplotlib_is_a_one_line_hint(cli, logit_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = cli("evaluate", "--logits", logit_file, "--diagram", tmp_path / "r.png", "--bootstrap", "0")
    assert code == 1 and "pip install 'calibrate-teacher[plot]'" in err
    assert err.strip().count("\n") == 0 and not (tmp_path / "r.png").exists()


def test_missing_matplotlib_is_found_before_any_output(cli, logit_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = tmp_path / "r.json"
    code, _, err = cli("fit", "--logits", logit_file, "--diagram", tmp_path / "r.png", "--report", report)
    assert code == 1 and "matplotlib" in err and not report.exists()


def _shape(x):
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return type(x).__name__


def test_report_json_shape_is_pinned_by_a_golden_file(cli, logit_file):
    """Changing the report's shape means bumping format_version and a CHANGELOG line."""
    golden = json.loads((Path(__file__).parent / "golden" / "report-shape.json").read_text())
    code, out, err = cli("fit", "--logits", logit_file, "--objective", "nll", "--json", "--bootstrap", "10")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format_version"] == 2  # 2: notes, and temperature in evaluations (#9)
    assert doc.pop("source") == {"logits": str(logit_file), "num_samples": 400, "num_classes": 5}
    assert _shape(doc) == golden["fit"]
    code, out, err = cli("evaluate", "--logits", logit_file, "--json", "--bootstrap", "10")
    assert code == 0, err
    doc = json.loads(out)
    doc.pop("source")
    assert _shape(doc) == golden["evaluation"]


def test_version_flag_matches_the_package_metadata(cli):
    from importlib.metadata import version

    import calibrate_teacher

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"calibrate-teacher {calibrate_teacher.__version__}"
    assert calibrate_teacher.__version__ == version("calibrate-teacher")


def test_fit_warns_when_t_below_one_would_sharpen_the_teacher(cli, tmp_path):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (300,), generator=g)
    logits = 0.3 * torch.randn(300, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    path = tmp_path / "under.safetensors"
    LogitSet(logits, labels).save(path)  # accurate but timid: underconfident
    code, out, err = cli("fit", "--logits", path, "--objective", "nll", "--bootstrap", "0")
    assert code == 0, err
    assert "T < 1 sharpens" in " ".join(out.split())
    code, out, _ = cli("fit", "--logits", path, "--objective", "nll", "--bootstrap", "0", "--json")
    doc = json.loads(out)
    assert doc["temperature"] < 1 and doc["paper"]["sharpens"] is True
