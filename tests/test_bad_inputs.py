"""Bad inputs (#12): one line on stderr naming the file, the right exit code, no traceback, nothing new.

Each case builds its bad input in ``tmp_path``, runs the real CLI in process and checks the whole
contract. Cases of the soft-label cache and image folders live beside their own tests
(tests/test_cache_safety.py, tests/test_image_safety.py); .pt2 archives in tests/test_pt2_safety.py.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _teacher_fixtures as fx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibrate_teacher.baking import bake_temperature
from calibrate_teacher.errors import TeacherError
from calibrate_teacher.teachers import load_teacher


@pytest.fixture(scope="module")
def net():
    return fx.tiny_net()


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def one_line_error(code: int, err: str, *, names: str, exit_code: int = 1) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert names in lines[0], err


def arrays(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, inputs=rng.standard_normal((n, fx.IN_FEATURES)).astype(np.float32),
             labels=rng.integers(0, fx.CLASSES, n))
    return path


# --- ONNX external data -----------------------------------------------------------------------


def external_model(net, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    return fx.save_onnx(fx.onnx_model(net), folder / "m.onnx", external=True)


def test_external_data_symlink_to_a_secret_is_refused_and_nothing_is_copied(tmp_path, cli, net):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET" * 1000)
    model = external_model(net, tmp_path / "model")
    weights = model.with_name("m.onnx.weights")
    # A model whose data file is a link to the secret (even for one unused initializer).
    proto = onnx.load(str(model), load_external_data=False)
    unused = numpy_helper.from_array(np.zeros(4, np.float32), "unused")
    unused.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "leak.bin"), ("offset", "0"), ("length", "16")):
        entry = unused.external_data.add()
        entry.key, entry.value = key, value
    unused.ClearField("float_data")
    unused.ClearField("raw_data")
    proto.graph.initializer.append(unused)
    onnx.save(proto, str(model))
    (model.parent / "leak.bin").symlink_to(secret)
    data = arrays(tmp_path / "data.npz")
    before = tree(tmp_path)
    for args in (
        ["bake", model, "-t", "1.5", "--out", tmp_path / "out" / "m.onnx"],
        ["evaluate", model, "--data", data],
        ["fit", model, "--data", data],
    ):
        code, _, err = cli(*args)
        one_line_error(code, err, names="leak.bin")
        assert "outside the model's folder" in err
    assert tree(tmp_path) == before
    assert weights.is_file()


def test_bake_never_copies_an_unused_initializer(tmp_path, net):
    model = external_model(net, tmp_path / "model")
    proto = onnx.load(str(model), load_external_data=False)
    # An unused initializer whose bytes sit in a second data file inside the folder.
    marker = b"UNUSED-BYTES" * 64
    (model.parent / "extra.bin").write_bytes(marker)
    unused = onnx.TensorProto(name="unused", data_type=onnx.TensorProto.UINT8, dims=[len(marker)])
    unused.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "extra.bin"), ("offset", "0"), ("length", str(len(marker)))):
        entry = unused.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(unused)
    onnx.save(proto, str(model))
    result = bake_temperature(model, 2.0, tmp_path / "out" / "m.onnx", device="cpu")
    copied = result.extra_files[0].read_bytes()
    assert b"UNUSED-BYTES" not in copied
    baked = onnx.load(str(result.path), load_external_data=False)
    assert "unused" not in {t.name for t in baked.graph.initializer}
    # Only the used tensors' bytes travel: the copy is the weights file's size (plus alignment).
    assert len(copied) < (model.parent / "m.onnx.weights").stat().st_size + 4096 * 4


def test_bake_output_is_no_more_readable_than_its_input(tmp_path, net):
    model = external_model(net, tmp_path / "model")
    for path in model.parent.iterdir():
        path.chmod(0o600)
    result = bake_temperature(model, 2.0, tmp_path / "out" / "m.onnx", device="cpu")
    for path in (result.path, *result.extra_files):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_external_data_past_the_end_of_its_file_is_one_line(tmp_path, cli, net):
    model = external_model(net, tmp_path / "model")
    proto = onnx.load(str(model), load_external_data=False)
    entry = next(e for e in proto.graph.initializer[0].external_data if e.key == "offset")
    entry.value = str(10**9)
    onnx.save(proto, str(model))
    code, _, err = cli("evaluate", model, "--data", arrays(tmp_path / "d.npz"))
    one_line_error(code, err, names="m.onnx.weights")
    assert "past the file" in err
    with pytest.raises(TeacherError, match="past the file"):
        load_teacher(model, device="cpu")


# --- TorchScript --------------------------------------------------------------------------------


def test_torchscript_that_reads_files_is_refused(tmp_path, cli):
    source = tmp_path / "reader.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Reader(torch.nn.Module):
            def forward(self, x):
                y = torch.from_file("/etc/hostname", size=2, dtype=torch.uint8)
                return x[:, :2] + y.float()
    """))
    script = tmp_path / "save.py"
    target = tmp_path / "reader.pt"
    script.write_text(
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); from reader import Reader\n"
        f"torch.jit.save(torch.jit.script(Reader()), {str(target)!r})\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", str(script)], check=True)
    code, _, err = cli("evaluate", target, "--data", arrays(tmp_path / "d.npz"))
    one_line_error(code, err, names="reader.pt")
    assert "reads or writes files" in err


# --- --arch user code -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("def factory():\n    raise ValueError('bad width')\n", "ValueError"),
        ("import not_a_real_module_xyz\ndef factory():\n    pass\n", "ModuleNotFoundError"),
        ("def factory(:\n    pass\n", "SyntaxError"),
        ("raise RuntimeError('at import')\ndef factory():\n    pass\n", "RuntimeError"),
        ("def factory():\n    return {}['missing']\n", "KeyError"),
    ],
)
def test_arch_code_that_raises_is_one_line(tmp_path, cli, net, body, expected):
    arch = tmp_path / "arch.py"
    arch.write_text(body)
    weights = fx.save_safetensors(net, tmp_path / "w.safetensors")
    code, _, err = cli("evaluate", weights, "--arch", f"{arch}:factory", "--data", arrays(tmp_path / "d.npz"))
    one_line_error(code, err, names=f"{arch}:factory")
    assert expected in err
    assert ":factory" in err  # printed as typed, never turned into an emoji


# --- outputs that cannot be written are found before the teacher runs ----------------------------


@pytest.fixture
def unwritable(monkeypatch):
    """Make one folder refuse new files, as a read-only mount or an immutable folder does."""
    import tempfile

    denied: list[Path] = []
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        folder = Path(kwargs.get("dir") or ".").resolve()
        if any(folder == d.resolve() for d in denied):
            raise OSError(errno.EROFS, "Read-only file system", str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return denied


@pytest.fixture
def teacher_runs(monkeypatch):
    """Count teacher batches, to prove a refusal came before the long run."""
    from calibrate_teacher import collect

    calls: list[int] = []
    real = collect.iter_logits

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls.append(1)
            yield batch

    monkeypatch.setattr(collect, "iter_logits", counting)
    return calls


@pytest.mark.parametrize("output", ["report", "save-logits", "baked"])
def test_unwritable_outputs_fail_before_the_teacher_runs(tmp_path, cli, net, unwritable, teacher_runs, output):
    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "m.onnx")
    data = arrays(tmp_path / "d.npz")
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable.append(locked)
    args = {
        "report": ["--report", locked / "r.json"],
        "save-logits": ["--save-logits", locked / "l.safetensors"],
        "baked": ["--out", locked / "m.onnx"],
    }[output]
    before = tree(tmp_path)
    code, _, err = cli("fit", model, "--data", data, *args)
    one_line_error(code, err, names=str(locked))
    assert "Read-only file system" in err
    assert teacher_runs == []
    assert tree(tmp_path) == before


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, cli, net, monkeypatch):
    import safetensors.torch

    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "m.onnx")
    data = arrays(tmp_path / "d.npz")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = tree(tmp_path)
    code, _, err = cli("evaluate", model, "--data", data, "--save-logits", tmp_path / "l.safetensors")
    one_line_error(code, err, names="l.safetensors")
    assert "No space left on device" in err
    assert tree(tmp_path) == before


# --- --save-logits writes what its suffix says -----------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_save_logits_writes_the_format_its_suffix_names(tmp_path, cli, net, suffix):
    from calibrate_teacher.logits import load_logits

    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "m.onnx")
    data = arrays(tmp_path / "d.npz")
    saved = tmp_path / f"l{suffix}"
    code, _, err = cli("evaluate", model, "--data", data, "--save-logits", saved)
    assert code == 0, err
    head = saved.read_bytes()[:4]
    assert (head == b"PK\x03\x04") == (suffix in (".npz", ".pt"))
    if suffix == ".npz":
        with np.load(saved, allow_pickle=False) as archive:
            assert set(archive.files) == {"logits", "labels", "keys"}
    back = load_logits(saved)
    x = np.load(data)["inputs"]
    import torch

    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(back.logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert back.keys is not None and len(back.keys) == len(x)


def test_save_logits_refuses_a_suffix_it_cannot_write_before_the_run(tmp_path, cli, net, teacher_runs):
    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "m.onnx")
    code, _, err = cli("evaluate", model, "--data", arrays(tmp_path / "d.npz"), "--save-logits", tmp_path / "l.txt")
    one_line_error(code, err, names="l.txt")
    assert teacher_runs == []
    assert not (tmp_path / "l.txt").exists()


# --- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_prints_the_line_and_exits_130(tmp_path, net):
    started = tmp_path / "started"
    arch = tmp_path / "slow.py"
    arch.write_text(textwrap.dedent(f"""
        import pathlib, time, torch

        class Slow(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Linear({fx.IN_FEATURES}, {fx.CLASSES})

            def forward(self, x):
                pathlib.Path({str(started)!r}).touch()
                time.sleep(0.05)
                return self.body(x)

        def factory():
            return Slow()
    """))
    import torch
    from safetensors.torch import save_file

    save_file({"body.weight": torch.randn(fx.CLASSES, fx.IN_FEATURES), "body.bias": torch.zeros(fx.CLASSES)},
              str(tmp_path / "w.safetensors"))
    data = arrays(tmp_path / "d.npz", n=4000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CALIBRATE_TEACHER_DEBUG", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "calibrate_teacher", "evaluate", str(tmp_path / "w.safetensors"),
         "--arch", f"{arch}:factory", "--data", str(data), "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "Interrupted. Completed outputs are kept; rerun the same command to resume." in err


# --- array files never unpickle ---------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("what", ["data", "logits"])
def test_npz_with_a_pickled_object_array_runs_nothing(tmp_path, cli, net, what):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(evil, inputs=payload, labels=np.zeros(1, np.int64), logits=payload)
    model = fx.save_onnx(fx.onnx_model(net), tmp_path / "m.onnx")
    args = ["evaluate", model, "--data", evil] if what == "data" else ["evaluate", "--logits", evil]
    before = tree(tmp_path)
    code, _, err = cli(*args)
    one_line_error(code, err, names="evil.npz")
    assert not marker.exists()
    assert tree(tmp_path) == before
