"""The README's main job on the shipped example teacher, end to end (issues #2-#4)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from calibrate_teacher import load_logits, load_teacher

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"



@pytest.fixture
def digits(tmp_path):
    for name in ("teacher.onnx", "teacher.pt", "teacher.safetensors", "teacher.preprocess.json", "digits_arch.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    shutil.copytree(EXAMPLE / "val", tmp_path / "val")
    return tmp_path


def test_fit_onnx_teacher_on_image_folder(cli, digits):
    report = digits / "fit.json"
    code, out, err = cli("fit", digits / "teacher.onnx", "--data", digits / "val", "--json",
                         "--report", report, "--save-logits", digits / "val.safetensors", "--bootstrap", "20")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"]["num_samples"] == 1201 and doc["source"]["num_classes"] == 10
    assert doc["source"]["data"]["preprocess"]["input_size"] == [1, 16, 16]
    # the example is deliberately overconfident: ECE falls and T > 1
    assert doc["before"]["ece_over"] > doc["before"]["ece_under"]
    assert doc["temperature"] > 1.0 and doc["after"]["ece"] < doc["before"]["ece"]
    baked = digits / "teacher.calibrated.onnx"
    assert doc["baked"]["path"] == str(baked) and baked.is_file()
    # the saved logits reproduce the fit without the teacher, and the baked teacher is z / T
    code, out2, err = cli("fit", "--logits", digits / "val.safetensors", "--json", "--bootstrap", "20")
    assert code == 0, err
    assert json.loads(out2)["temperature"] == doc["temperature"]
    ls = load_logits(digits / "val.safetensors")
    assert ls.keys is not None and ls.keys[0].startswith("0/")
    x = torch.randn(4, 1, 16, 16)
    original, calibrated = load_teacher(digits / "teacher.onnx"), load_teacher(baked)
    assert torch.allclose(calibrated.logits(x), original.logits(x) / doc["temperature"], atol=1e-4)


@pytest.mark.parametrize(
    ("teacher", "extra"),
    [("teacher.pt", []), ("teacher.safetensors", ["--arch", "digits_arch.py:digits_cnn"])],
)
def test_other_formats_give_the_same_metrics(cli, digits, teacher, extra):
    code, out, err = cli("evaluate", digits / "teacher.onnx", "--data", digits / "val", "--json",
                         "--bootstrap", "0")
    assert code == 0, err
    reference = json.loads(out)["metrics"]
    extra = [str(digits / e) if e.endswith(".py:digits_cnn") else e for e in extra]
    code, out, err = cli("evaluate", digits / teacher, "--data", digits / "val", "--json",
                         "--bootstrap", "0", "--preprocess", digits / "teacher.preprocess.json", *extra)
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["accuracy"] == reference["accuracy"]
    assert metrics["ece"] == pytest.approx(reference["ece"], abs=1e-4)


def test_bad_data_folder_is_one_line(cli, digits):
    (digits / "empty").mkdir()
    code, out, err = cli("fit", digits / "teacher.onnx", "--data", digits / "empty")
    assert code == 1 and out == "" and "empty" in err and err.strip().count("\n") == 0
    assert not (digits / "teacher.calibrated.onnx").exists()


def test_corrupt_image_fails_or_is_skipped(cli, digits):
    bad = digits / "val" / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    code, _, err = cli("evaluate", digits / "teacher.onnx", "--data", digits / "val")
    assert code == 1 and "broken.png" in err
    code, out, err = cli("evaluate", digits / "teacher.onnx", "--data", digits / "val", "--skip-bad",
                         "--json", "--bootstrap", "0")
    assert code == 0, err
    doc = json.loads(out)
    assert [s["key"] for s in doc["source"]["skipped"]] == ["3/broken.png"]
    assert doc["metrics"]["num_samples"] == 1201


def test_example_generator_rebuilds_a_working_teacher(tmp_path, cli):
    """examples/make_digits_teacher.py runs offline and its outputs load in every format."""
    import subprocess
    import sys

    out = tmp_path / "digits"
    done = subprocess.run([sys.executable, str(EXAMPLE.parent / "make_digits_teacher.py"), "--out", str(out),
                           "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "val").is_dir() and (out / "train").is_dir()
    x = torch.randn(3, 1, 16, 16)
    reference = load_teacher(out / "teacher.onnx").logits(x)
    assert torch.allclose(load_teacher(out / "teacher.pt").logits(x), reference, atol=1e-4)
    via_arch = load_teacher(out / "teacher.safetensors", arch=f"{EXAMPLE / 'digits_arch.py'}:digits_cnn")
    assert torch.allclose(via_arch.logits(x), reference, atol=1e-4)
    code, _, err = cli("evaluate", out / "teacher.onnx", "--data", out / "val", "--bootstrap", "0", "--json")
    assert code == 0, err
