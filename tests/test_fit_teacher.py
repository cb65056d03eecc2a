"""``fit TEACHER --logits`` bakes the fitted T into the teacher (issue #3, part 3)."""

import json

import _teacher_fixtures as fx
import pytest
import torch

from calibrate_teacher import LogitSet, calibrate, load_teacher


@pytest.fixture
def teacher_and_logits(tmp_path):
    torch.manual_seed(0)
    net = fx.tiny_net().eval()
    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "teacher.onnx")
    x = torch.randn(300, fx.IN_FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = net(x)
    # labels agree with the teacher 70% of the time, so T moves away from 1
    flip = torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.3
    labels = torch.where(flip, torch.randint(0, fx.CLASSES, (300,)), z.argmax(1))
    logits = tmp_path / "val.safetensors"
    LogitSet(z, labels).save(logits)
    return net, model, logits, x


def test_fit_with_teacher_bakes_the_fitted_temperature(cli, tmp_path, teacher_and_logits):
    net, model, logits, x = teacher_and_logits
    out = tmp_path / "baked.onnx"
    code, stdout, err = cli("fit", str(model), "--logits", str(logits), "--objective", "nll",
                            "--out", str(out), "--json", "--bootstrap", "0")
    assert code == 0, err
    doc = json.loads(stdout)
    t = doc["temperature"]
    from calibrate_teacher import fit_temperature, load_logits

    ls = load_logits(logits)
    assert t == fit_temperature(ls.logits, ls.labels, objective="nll").temperature
    assert doc["baked"]["path"] == str(out) and doc["baked"]["temperature"] == t
    baked = load_teacher(out, device="cpu")
    with torch.no_grad():
        expected = net(x[:20]) / t
    assert torch.allclose(baked.logits(x[:20]).cpu(), expected, atol=1e-5)
    # the same fit again refuses to overwrite the baked teacher, and leaves it untouched
    before = out.read_bytes()
    code, _, err = cli("fit", str(model), "--logits", str(logits), "--out", str(out))
    assert code == 1 and "already exists" in err and out.read_bytes() == before


def test_default_baked_path_and_no_bake(cli, tmp_path, teacher_and_logits):
    _, model, logits, _ = teacher_and_logits
    code, _, err = cli("fit", str(model), "--logits", str(logits), "--no-bake", "--bootstrap", "0")
    assert code == 0, err
    assert not (tmp_path / "teacher.calibrated.onnx").exists()
    code, _, err = cli("fit", str(model), "--logits", str(logits), "--temperature", "1.5", "--bootstrap", "0")
    assert code == 0, err
    assert (tmp_path / "teacher.calibrated.onnx").is_file() and "baked teacher written" in err


def test_library_calibrate_returns_fit_and_bake(tmp_path, teacher_and_logits):
    net, model, logits, x = teacher_and_logits
    run_ = calibrate(model, logits=logits, objective="fixed", temperature=2.0, out=tmp_path / "t2.onnx")
    assert run_.fit.temperature == 2.0 and run_.baked is not None
    assert run_.baked.max_abs_error <= 1e-5
    with torch.no_grad():
        assert torch.allclose(load_teacher(run_.baked.path).logits(x[:5]).cpu(), net(x[:5]) / 2, atol=1e-5)
