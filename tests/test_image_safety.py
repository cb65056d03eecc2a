"""Image folders that must not fool or hang the scan and the decoder (issue #12).

Symlinks out of the folder or into a loop, FIFOs and sockets named like images, folders that
cannot be listed, and 16-bit images that ``convert("RGB")`` used to clip to black and white.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibrate_teacher.collect import collect_logits
from calibrate_teacher.data import ImageFolderSource, open_data
from calibrate_teacher.data.preprocess import PreprocessConfig
from calibrate_teacher.data.transform import preprocess_image
from calibrate_teacher.errors import InputError
from calibrate_teacher.teachers import load_teacher

CONFIG = PreprocessConfig(input_size=(3, 8, 8), crop_pct=1.0, mean=(0.5,), std=(0.5,))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def write_images(root: Path, counts: dict[str, int], *, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for cls, count in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"img{i:02d}.png")
            keys.append(f"{cls}/img{i:02d}.png")
    return keys


def keys_of(source) -> list[str]:
    return [k for b in source.batches(batch_size=4) for k in b.keys]


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if not p.is_symlink()}


@pytest.fixture
def no_hang():
    """Fail (instead of blocking the test run) when something waits on a FIFO."""

    def _fail(signum, frame):
        raise TimeoutError("blocked: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, _fail)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def digits(tmp_path):
    """The example ONNX teacher and a 30-image slice of its validation folder."""
    for name in ("teacher.onnx", "teacher.preprocess.json"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    for cls in sorted(p.name for p in (EXAMPLE / "val").iterdir()):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for image in sorted((EXAMPLE / "val" / cls).glob("*.png"))[:3]:
            shutil.copy(image, tmp_path / "val" / cls / image.name)
    return tmp_path


def deny_listing(monkeypatch, *paths: Path) -> None:
    """Make os.scandir fail for ``paths`` as it does for a non-root user without r/x rights."""
    real = os.scandir
    denied = {os.fspath(p) for p in paths}

    def scandir(path="."):
        if os.fspath(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


# --- symlinks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["..", ".", "../.."])
def test_symlink_loop_is_an_error_naming_the_link(tmp_path, target):
    write_images(tmp_path / "val", {"2": 2, "3": 2})
    (tmp_path / "val" / "3" / "deep").mkdir()
    link = tmp_path / "val" / "3" / "deep" / "loop"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(InputError, match=r"val/3/deep/loop: symlink points into a loop \(to "):
        open_data(tmp_path / "val", preprocess=CONFIG)


def test_symlink_loop_with_skip_bad_is_a_reported_skip(tmp_path):
    keys = write_images(tmp_path / "val", {"2": 2, "3": 3})
    (tmp_path / "val" / "3" / "loop").symlink_to("..", target_is_directory=True)
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert len(source) == 5  # not 5 + everything found again round the loop
    assert keys_of(source) == sorted(keys)
    [(key, reason)] = source.skipped
    assert key == "3/loop" and "points into a loop" in reason


def test_mutual_folder_links_are_a_loop(tmp_path):
    write_images(tmp_path / "val", {"a": 1})
    (tmp_path / "val" / "a" / "x").mkdir()
    (tmp_path / "val" / "a" / "y").symlink_to("x", target_is_directory=True)
    (tmp_path / "val" / "a" / "x" / "back").symlink_to("../y", target_is_directory=True)
    with pytest.raises(InputError, match=r"val/a/x/back: symlink points into a loop"):
        open_data(tmp_path / "val", preprocess=CONFIG)


def test_folder_link_outside_the_root_is_an_error(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    write_images(tmp_path / "elsewhere", {"x": 2})
    (tmp_path / "val" / "b" / "ext").symlink_to(tmp_path / "elsewhere" / "x")
    with pytest.raises(
        InputError, match=r"val/b/ext: symlink points outside the data folder \(to .*elsewhere/x\)"
    ):
        open_data(tmp_path / "val", preprocess=CONFIG)
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert keys_of(source) == ["a/img00.png", "b/img00.png"]
    assert [k for k, _ in source.skipped] == ["b/ext"]


def test_class_folder_link_outside_keeps_its_label_when_skipped(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "c": 1})
    write_images(tmp_path / "elsewhere", {"b": 2})
    (tmp_path / "val" / "b").symlink_to(tmp_path / "elsewhere" / "b")
    with pytest.raises(InputError, match=r"val/b: symlink points outside the data folder"):
        open_data(tmp_path / "val", preprocess=CONFIG)
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert source.class_names == ("a", "b", "c")
    assert [b.labels.tolist() for b in source.batches(batch_size=8)] == [[0, 2]]


def test_file_links_are_followed_inside_the_root_only(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    write_images(tmp_path / "elsewhere", {"x": 1})
    (tmp_path / "val" / "b" / "copy.png").symlink_to("../a/img00.png")
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    batch = next(iter(source.batches(batch_size=8)))
    assert batch.keys == ("a/img00.png", "b/copy.png", "b/img00.png")
    torch.testing.assert_close(batch.inputs[0], batch.inputs[1], atol=0, rtol=0)
    (tmp_path / "val" / "b" / "ext.png").symlink_to(tmp_path / "elsewhere" / "x" / "img00.png")
    with pytest.raises(InputError, match=r"val/b/ext.png: symlink points outside the data folder"):
        open_data(tmp_path / "val", preprocess=CONFIG)


def test_links_inside_the_root_and_a_linked_root_are_followed(tmp_path):
    write_images(tmp_path / "val", {"a": 2, "b": 1})
    (tmp_path / "val" / "b" / "more").symlink_to("../a", target_is_directory=True)
    (tmp_path / "val" / "a" / ".hidden_loop").symlink_to("..", target_is_directory=True)
    (tmp_path / "link").symlink_to(tmp_path / "val", target_is_directory=True)
    for root in (tmp_path / "val", tmp_path / "link"):
        source = open_data(root, preprocess=CONFIG)
        assert keys_of(source) == [
            "a/img00.png", "a/img01.png", "b/img00.png", "b/more/img00.png", "b/more/img01.png"
        ]


# --- regular files only -----------------------------------------------------------------------


@needs_fifo
def test_fifo_named_like_an_image_is_an_error_not_a_hang(tmp_path, no_hang):
    write_images(tmp_path / "val", {"a": 2})
    os.mkfifo(tmp_path / "val" / "a" / "x.png")
    os.mkfifo(tmp_path / "val" / "a" / "notes.txt")  # not an image name: ignored, never opened
    with pytest.raises(
        InputError, match=r"val/a/x.png: is a FIFO \(named pipe\), not a regular file; .*--skip-bad"
    ):
        open_data(tmp_path / "val", preprocess=CONFIG)
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert keys_of(source) == ["a/img00.png", "a/img01.png"]
    assert source.skipped == [("a/x.png", "is a FIFO (named pipe), not a regular file")]
    assert source.description["ignored_files"] == 1


@needs_fifo
@pytest.mark.parametrize("workers", [0, 1])
def test_file_swapped_for_a_fifo_after_the_scan(tmp_path, no_hang, workers):
    write_images(tmp_path / "val", {"a": 3})
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    skipping = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    (tmp_path / "val" / "a" / "img01.png").unlink()
    os.mkfifo(tmp_path / "val" / "a" / "img01.png")
    with pytest.raises(InputError, match=r"val/a/img01.png: cannot decode the image \(a FIFO"):
        list(source.batches(batch_size=2, workers=workers))
    assert [k for b in skipping.batches(batch_size=2, workers=workers) for k in b.keys] == [
        "a/img00.png", "a/img02.png"
    ]
    assert skipping.skipped == [("a/img01.png", "a FIFO (named pipe), not a regular file")]


def test_socket_named_like_an_image_is_refused(tmp_path, monkeypatch):
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("needs AF_UNIX sockets")
    write_images(tmp_path / "val", {"a": 1})
    monkeypatch.chdir(tmp_path / "val" / "a")  # a short relative path: AF_UNIX names are short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.png")
        with pytest.raises(InputError, match=r"val/a/s.png: is a socket, not a regular file"):
            open_data(tmp_path / "val", preprocess=CONFIG)


# --- unreadable folders -----------------------------------------------------------------------


def test_unreadable_folder_is_an_error_or_a_reported_skip(tmp_path, monkeypatch):
    write_images(tmp_path / "val", {"a": 2, "b": 1})
    write_images(tmp_path / "val" / "b", {"private": 2})
    deny_listing(monkeypatch, tmp_path / "val" / "b" / "private")
    with pytest.raises(
        InputError,
        match=r"val/b/private: cannot read the folder \(PermissionError: Permission denied\); "
        r"fix its permissions",
    ):
        open_data(tmp_path / "val", preprocess=CONFIG)
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert keys_of(source) == ["a/img00.png", "a/img01.png", "b/img00.png"]
    assert source.skipped == [
        ("b/private", "cannot read the folder (PermissionError: Permission denied)")
    ]


def test_unreadable_class_folder_and_root(tmp_path, monkeypatch):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    deny_listing(monkeypatch, tmp_path / "val" / "b")
    with pytest.raises(InputError, match=r"val/b: cannot read the folder"):
        open_data(tmp_path / "val", preprocess=CONFIG)
    deny_listing(monkeypatch, tmp_path / "val")
    with pytest.raises(InputError, match=r"val: cannot read the folder \(PermissionError"):
        ImageFolderSource(tmp_path / "val", config=CONFIG, skip_bad=True)


def test_every_folder_skipped_is_an_error(tmp_path, monkeypatch):
    write_images(tmp_path / "val", {"a": 1})
    deny_listing(monkeypatch, tmp_path / "val" / "a")
    with pytest.raises(InputError, match=r"val: no readable images; 1 entries were skipped"):
        open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)


def test_unreadable_folder_for_real(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "val" / "b").chmod(0)
    try:
        try:
            os.listdir(tmp_path / "val" / "b")
        except PermissionError:
            pass
        else:
            pytest.skip("permissions are not enforced here (root can list any folder)")
        with pytest.raises(InputError, match=r"val/b: cannot read the folder \(PermissionError"):
            open_data(tmp_path / "val", preprocess=CONFIG)
        source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
        assert keys_of(source) == ["a/img00.png"] and [k for k, _ in source.skipped] == ["b"]
    finally:
        (tmp_path / "val" / "b").chmod(0o755)


# --- high bit depth ---------------------------------------------------------------------------


def smooth_image(height: int = 40, width: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (127.5 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).round().astype(np.uint8)


def high_depth(pixels: np.ndarray, mode: str) -> Image.Image:
    """The 8-bit ``pixels`` in a high bit depth mode, holding the same intensities."""
    wide = pixels.astype(np.uint16) * 257  # v / 65535 == p / 255 exactly
    if mode == "I;16":
        return Image.fromarray(wide)
    if mode == "I;16B":
        return Image.fromarray(wide.astype(">u2"))
    if mode == "I;16L":
        return Image.frombytes("I;16L", pixels.shape[::-1], wide.astype("<u2").tobytes())
    if mode == "I":
        return Image.fromarray(wide.astype(np.int32))
    return Image.fromarray(pixels.astype(np.float32) / 255)  # "F": intensities on [0, 1]


GEOMETRIES = [
    PreprocessConfig(input_size=(1, 40, 30), crop_pct=1.0, mean=(0.3,), std=(0.2,)),  # identity
    PreprocessConfig(input_size=(3, 24, 24), interpolation="bilinear", std=(0.2,)),
    PreprocessConfig(input_size=(1, 50, 60), crop_pct=0.9, interpolation="bicubic"),
    PreprocessConfig(input_size=(3, 16, 16), crop_pct=1.0, interpolation="lanczos"),
    PreprocessConfig(input_size=(1, 16, 20), crop_mode="squash", interpolation="box"),
    PreprocessConfig(input_size=(3, 48, 48), crop_pct=1.0, interpolation="hamming"),  # pads
]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
@pytest.mark.parametrize("config", GEOMETRIES, ids=lambda c: f"{c.input_size}-{c.interpolation}")
def test_high_depth_image_matches_its_8bit_version(mode, config):
    pixels = smooth_image()
    image = high_depth(pixels, mode)
    assert image.mode == mode
    eight = preprocess_image(Image.fromarray(pixels), config)
    wide = preprocess_image(image, config)
    assert wide.shape == eight.shape == config.input_size and wide.dtype == torch.float32
    std = torch.tensor(config.std).view(-1, 1, 1)
    if config.input_size[1:] == (40, 30):  # no resize: the same values
        torch.testing.assert_close(wide, eight, atol=1e-6, rtol=0)
    else:  # the 8-bit path rounds after each of its two resize passes: at most one level
        assert float(((wide - eight) * std).abs().max()) <= 1.05 / 255


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(wide).save(tmp_path / "x.png")
    config = PreprocessConfig(input_size=(3, 4, 4), crop_pct=1.0, mean=(0.0,), std=(1.0,))
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode == "I;16"  # what Pillow makes of a 16-bit grayscale PNG
        x = preprocess_image(image, config)
    expected = torch.tensor([0, 1000, 32768, 65535], dtype=torch.float32) / 65535
    torch.testing.assert_close(x, expected.expand(3, 4, 4), atol=1e-7, rtol=0)


def test_high_depth_filter_overshoot_is_clipped_as_in_8_bit():
    edge = np.zeros((8, 8), dtype=np.uint8)
    edge[:, 4:] = 255  # a hard edge: lanczos rings below 0 and above 1
    config = PreprocessConfig(
        input_size=(1, 16, 16), crop_pct=1.0, interpolation="lanczos", mean=(0.0,), std=(1.0,)
    )
    x = preprocess_image(high_depth(edge, "I;16"), config)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_16bit_folder_gives_the_teachers_8bit_logits(digits):
    """End to end: the example teacher on 16-bit copies of its images (was accuracy 0.78)."""
    for png in sorted((digits / "val").rglob("*.png")):
        target = digits / "val16" / png.relative_to(digits / "val")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(target)
    with Image.open(next((digits / "val16").rglob("*.png"))) as image:
        assert image.mode == "I;16"
    teacher = load_teacher(digits / "teacher.onnx")
    eight = collect_logits(teacher, open_data(digits / "val", teacher=teacher), batch_size=16)
    wide = collect_logits(teacher, open_data(digits / "val16", teacher=teacher), batch_size=16)
    assert wide.keys == eight.keys and len(wide.keys) == 30
    # logits reach about 40; one 8-bit level of input moves them by under 0.1 (clipping: 20)
    torch.testing.assert_close(wide.logits, eight.logits, atol=0.2, rtol=0)
    torch.testing.assert_close(wide.logits.softmax(1), eight.logits.softmax(1), atol=1e-3, rtol=0)
    assert torch.equal(wide.logits.argmax(1), eight.logits.argmax(1))


# --- through the CLI --------------------------------------------------------------------------


def assert_one_line_error(code: int, err: str, name: str) -> None:
    assert code == 1, err
    assert err.strip().count("\n") == 0, err
    assert name in err and "Traceback" not in err


def test_cli_symlink_loop_fails_in_one_line(cli, digits):
    (digits / "val" / "3" / "loop").symlink_to("..", target_is_directory=True)
    before = files_under(digits)
    code, out, err = cli(
        "evaluate", digits / "teacher.onnx", "--data", digits / "val",
        "--report", digits / "report.json", "--save-logits", digits / "val.safetensors",
    )
    assert_one_line_error(code, err, "val/3/loop")
    assert "points into a loop" in err and out == ""
    assert files_under(digits) == before


def test_cli_symlink_loop_with_skip_bad_reports_it(cli, digits):
    (digits / "val" / "3" / "loop").symlink_to("..", target_is_directory=True)
    code, out, err = cli(
        "evaluate", digits / "teacher.onnx", "--data", digits / "val", "--skip-bad",
        "--json", "--bootstrap", "0",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"]["num_samples"] == 30
    assert [s["key"] for s in doc["source"]["skipped"]] == ["3/loop"]
    assert "skipped 1" in err


def test_cli_unreadable_folder_fails_in_one_line(cli, digits, monkeypatch):
    deny_listing(monkeypatch, digits / "val" / "7")
    before = files_under(digits)
    code, out, err = cli("fit", digits / "teacher.onnx", "--data", digits / "val")
    assert_one_line_error(code, err, "val/7")
    assert "cannot read the folder (PermissionError: Permission denied)" in err and out == ""
    assert files_under(digits) == before  # no teacher.calibrated.onnx


@needs_fifo
def test_cli_fifo_fails_in_one_line_without_hanging(digits):
    os.mkfifo(digits / "val" / "3" / "x.png")
    before = files_under(digits)
    env = {k: v for k, v in os.environ.items() if k != "CALIBRATE_TEACHER_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "calibrate_teacher", "evaluate", str(digits / "teacher.onnx"),
         "--data", str(digits / "val"), "--report", str(digits / "report.json")],
        capture_output=True, text=True, timeout=120, cwd=digits, env=env,
    )
    assert_one_line_error(done.returncode, done.stderr, "val/3/x.png")
    assert "is a FIFO (named pipe), not a regular file" in done.stderr and done.stdout == ""
    assert files_under(digits) == before
