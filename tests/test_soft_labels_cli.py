"""`export-soft-labels` and `inspect` end to end with tiny teachers, and as thin CLI skins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cache_fixtures import (
    expected_logits,
    reference_module,
    save_arrays,
    save_onnx,
    save_torchscript,
)
from safetensors.numpy import load_file

from calibrate_teacher.soft_labels import Calibration, SoftLabelCache, SoftLabelDataset
from calibrate_teacher.specs import DataSpec, TeacherSpec

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache_cli")
    module = reference_module()
    inputs, labels = save_arrays(folder / "train.npz")
    return {
        "module": module,
        "inputs": inputs,
        "labels": labels,
        "data": folder / "train.npz",
        "torchscript": save_torchscript(module, folder / "teacher.pt"),
        "onnx": save_onnx(module, folder / "teacher.onnx"),
    }


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_values_are_teacher_logits_over_t(setup, tmp_path, cli, fmt):
    out = tmp_path / "cache"
    code, stdout, err = cli(
        "export-soft-labels", setup[fmt], "--data", setup["data"], "--out", out,
        "--temperature", "1.5", "--shard-rows", "16", "--batch-size", "7", "--device", "cpu", "--json",
    )
    assert code == 0, err
    doc = json.loads(stdout)  # exactly one JSON document
    assert doc["manifest"]["complete"] and doc["manifest"]["teacher"]["format"] == fmt
    assert doc["manifest"]["teacher"]["file"] == Path(setup[fmt]).name
    cache = SoftLabelCache(out)
    ref = expected_logits(setup["module"], setup["inputs"]) / 1.5
    torch.testing.assert_close(cache.logits()[:], ref, atol=3e-3, rtol=1e-3)  # float16 storage
    assert np.array_equal(cache.labels.numpy(), setup["labels"])
    assert cache.keys == tuple(str(i) for i in range(45))
    assert [s.rows for s in cache.manifest.shards] == [16, 16, 13]


def test_export_top_k_keeps_the_largest_classes(setup, tmp_path, cli):
    out = tmp_path / "cache"
    code, _, err = cli("export-soft-labels", setup["onnx"], "--data", setup["data"],
                       "--out", out, "-t", "2", "--top-k", "2", "--device", "cpu")
    assert code == 0, err
    ref = expected_logits(setup["module"], setup["inputs"]) / 2.0
    shard = load_file(out / "shard-00000.safetensors")
    assert np.array_equal(shard["topk_index"], torch.topk(ref, 2).indices.numpy())
    exact = torch.softmax(ref.double(), 1)
    probs = SoftLabelCache(out).probs()[:].double()
    kept = torch.topk(ref, 2).indices
    torch.testing.assert_close(probs.gather(1, kept), exact.gather(1, kept), atol=2e-3, rtol=0)


def test_from_report_records_the_fit(setup, tmp_path, cli):
    report = tmp_path / "fit-report.json"
    report.write_text(json.dumps({"temperature": 1.83, "objective": "ece",
                                  "after": {"ece": 0.021, "nll": 0.33}}))
    code, out, err = cli("export-soft-labels", setup["torchscript"], "--data", setup["data"],
                         "--out", tmp_path / "c", "--from-report", report, "--device", "cpu")
    assert code == 0, err
    manifest = SoftLabelCache(tmp_path / "c").manifest
    assert manifest.calibration == Calibration(1.83, "fit", "ece", {"ece": 0.021, "nll": 0.33},
                                               "fit-report.json")
    assert "1.83 (fit (ece), from fit-report.json)" in out


def test_option_errors_exit_2_and_existing_cache_exits_1(setup, tmp_path, cli):
    base = ["export-soft-labels", setup["torchscript"], "--data", setup["data"], "--out", tmp_path / "c"]
    code, _, err = cli(*base)
    assert code == 2 and "exactly one of --temperature" in err
    code, _, err = cli(*base, "-t", "1.5", "--from-report", tmp_path / "r.json")
    assert code == 2
    code, _, err = cli(*base, "-t", "0")
    assert code == 1 and "temperature" in err and not (tmp_path / "c").exists()
    code, _, err = cli(*base, "-t", "1.5", "--top-k", "5")
    assert code == 1 and "--top-k 5" in err
    assert cli(*base, "-t", "1.5", "--device", "cpu")[0] == 0
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    code, _, err = cli(*base, "-t", "3", "--device", "cpu")
    assert code == 1 and err.startswith("Error (output exists)") and "--overwrite" in err
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    code, _, err = cli(*base, "-t", "3", "--overwrite", "--device", "cpu")
    assert code == 0 and SoftLabelCache(tmp_path / "c").temperature == 3.0


def test_cli_passes_options_to_the_library(monkeypatch, tmp_path, cli):
    calls = {}

    def fake_export(teacher, data, out, **kwargs):
        calls.update(teacher=teacher, data=data, out=out, **kwargs)
        raise SystemExit(0)

    import calibrate_teacher.jobs as jobs

    monkeypatch.setattr(jobs, "export_soft_labels", fake_export)
    code, _, err = cli("export-soft-labels", "t.onnx", "--data", "train/", "--out", "cache",
                       "-t", "1.5", "--top-k", "0", "--batch-size", "32", "--workers", "2",
                       "--shard-rows", "1000", "--no-resume", "--overwrite", "--device", "cpu",
                       "--output", "logits", "--mean", "0.5,0.5,0.5")
    assert code == 0, err
    assert calls["teacher"] == TeacherSpec(Path("t.onnx"), device="cpu", output="logits")
    assert calls["data"] == DataSpec(Path("train/"), overrides={"mean": (0.5, 0.5, 0.5)}, batch_size=32, workers=2)
    assert calls["temperature"] == Calibration(1.5)
    assert (calls["top_k"], calls["shard_rows"], calls["resume"], calls["overwrite"]) == (0, 1000, False, True)


def test_inspect_table_and_json(setup, tmp_path, cli):
    out = tmp_path / "c"
    assert cli("export-soft-labels", setup["torchscript"], "--data", setup["data"], "--out", out,
               "-t", "1.5", "--device", "cpu")[0] == 0
    code, stdout, err = cli("inspect", out, "--verify")
    assert code == 0, err
    assert "complete" in stdout and "45 x 5" in stdout and "1.5 (fixed)" in stdout
    assert "verified: 1 shard(s)" in stdout
    code, stdout, _ = cli("inspect", out, "--json")
    doc = json.loads(stdout)
    assert doc["manifest"]["data"]["num_samples"] == 45 and doc["verification"] is None
    code, _, err = cli("inspect", tmp_path / "nothing")
    assert code == 1 and "not a soft-label cache" in err


def test_commands_have_help_with_examples():
    for command in ("export-soft-labels", "inspect"):
        done = subprocess.run([sys.executable, "-m", "calibrate_teacher", command, "--help"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0 and "Examples:" in done.stdout


def test_dataset_over_exported_cache_with_workers(setup, tmp_path, cli):
    out = tmp_path / "c"
    assert cli("export-soft-labels", setup["onnx"], "--data", setup["data"], "--out", out,
               "-t", "1.5", "--shard-rows", "10", "--device", "cpu")[0] == 0
    inputs = torch.from_numpy(setup["inputs"])
    labels = torch.from_numpy(setup["labels"])
    dataset = SoftLabelDataset(torch.utils.data.TensorDataset(inputs, labels), out,
                               keys=[str(i) for i in range(45)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    rows = [t for _, _, t in loader]
    torch.testing.assert_close(torch.cat(rows), SoftLabelCache(out).logits()[:])


def test_example_script_runs_in_tiny_mode():
    done = subprocess.run([sys.executable, "examples/kd_with_cache.py", "--tiny", "--epochs", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "teacher calibrated at T = 3" in done.stdout
    accuracy = float(done.stdout.strip().rsplit(" ", 1)[1])
    assert accuracy > 0.8
