"""Data sources: image folders, array files, and the checks open_data makes against a teacher."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from calibrate_teacher.data import ArraySource, DataSource, ImageFolderSource, open_data
from calibrate_teacher.data.preprocess import PreprocessConfig
from calibrate_teacher.data.transform import preprocess_image
from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.teachers.base import InputSpec

CONFIG = PreprocessConfig(input_size=(3, 8, 8), crop_pct=1.0, mean=(0.5,), std=(0.5,))


@dataclass
class SpecOnly:
    """Enough of a Teacher for open_data's checks (it never runs one)."""

    path: Path
    num_classes: int
    input_spec: InputSpec | None
    format: str = "onnx"
    device: str = "cpu"


def write_images(root: Path, counts: dict[str, int], *, size=(10, 12), seed=0) -> list[str]:
    """Write counts[c] random images per class (PNG, JPEG, grayscale and RGBA mixed)."""
    rng = np.random.default_rng(seed)
    keys = []
    for cls, count in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            kind = i % 4
            if kind == 1:
                image = image.convert("L")
            elif kind == 2:
                image = image.convert("RGBA")
            suffix = ".jpg" if kind == 3 else ".png"
            image.save(root / cls / f"img{i:02d}{suffix}")
            keys.append(f"{cls}/img{i:02d}{suffix}")
    return keys


def reference_inputs(root: Path, keys: list[str], config: PreprocessConfig) -> torch.Tensor:
    out = []
    for key in keys:
        with Image.open(root / key) as image:
            out.append(preprocess_image(image, config))
    return torch.stack(out)


def all_batches(source, **kwargs):
    batches = list(source.batches(**kwargs))
    return (
        torch.cat([b.inputs for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([b.indices for b in batches]),
        [k for b in batches for k in b.keys],
    )


# --- image folders ----------------------------------------------------------------------------


def test_image_folder_order_keys_labels_and_pixels(tmp_path):
    keys = write_images(tmp_path / "val", {"dog": 3, "cat": 5})
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    assert isinstance(source, ImageFolderSource)
    assert isinstance(source, DataSource)
    assert source.class_names == ("cat", "dog")
    assert source.num_classes == 2
    expected_keys = sorted(k for k in keys if k.startswith("cat/")) + sorted(
        k for k in keys if k.startswith("dog/")
    )
    inputs, labels, indices, got_keys = all_batches(source, batch_size=3)
    assert got_keys == expected_keys
    assert labels.tolist() == [0] * 5 + [1] * 3
    assert indices.tolist() == list(range(8))
    torch.testing.assert_close(inputs, reference_inputs(tmp_path / "val", expected_keys, CONFIG))
    assert source.description["kind"] == "image_folder"
    assert source.description["num_samples"] == 8
    assert source.description["preprocess"] == CONFIG.to_json()
    assert source.description["preprocess_from"] == "the given config"


def test_keys_and_inputs_are_stable_across_worker_counts_and_runs(tmp_path):
    write_images(tmp_path / "val", {"a": 5, "b": 4, "c": 3})
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    first = all_batches(source, batch_size=4, workers=0)
    again = all_batches(open_data(tmp_path / "val", preprocess=CONFIG), batch_size=4, workers=0)
    workers = all_batches(source, batch_size=4, workers=2)
    for other in (again, workers):
        assert other[3] == first[3]
        torch.testing.assert_close(other[0], first[0], atol=0, rtol=0)
        assert torch.equal(other[1], first[1])
        assert torch.equal(other[2], first[2])


def test_indices_subset_keeps_the_given_order(tmp_path):
    keys = write_images(tmp_path / "val", {"a": 3, "b": 3})
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    order = [5, 0, 3]
    _inputs, labels, indices, got_keys = all_batches(source, batch_size=2, indices=order)
    assert indices.tolist() == order
    assert got_keys == [sorted(keys)[i] for i in order]
    assert labels.tolist() == [1, 0, 1]
    with pytest.raises(InvalidValueError, match=r"indices: 6 is out of range for 6 samples"):
        list(source.batches(batch_size=2, indices=[6]))


def test_classes_txt_sets_the_label_order(tmp_path):
    write_images(tmp_path / "val", {"cat": 1, "dog": 1})
    (tmp_path / "val" / "classes.txt").write_text("dog\n  cat \n\nbird\n")
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    assert source.class_names == ("dog", "cat", "bird")
    _, labels, _, keys = all_batches(source, batch_size=8)
    assert keys[0].startswith("dog/")
    assert labels.tolist() == [0, 1]
    assert source.description["ignored_files"] == 0  # classes.txt is not counted as ignored


def test_classes_argument_list_and_file(tmp_path):
    write_images(tmp_path / "val", {"cat": 1, "dog": 1})
    source = open_data(tmp_path / "val", preprocess=CONFIG, classes=["dog", "cat"])
    assert source.class_names == ("dog", "cat")
    names = tmp_path / "names.txt"
    names.write_text("x\ncat\ndog\n")
    source = open_data(tmp_path / "val", preprocess=CONFIG, classes=names)
    assert source.class_names == ("x", "cat", "dog")
    with pytest.raises(InputError, match=r"no such class list"):
        open_data(tmp_path / "val", preprocess=CONFIG, classes=tmp_path / "nope.txt")


def test_folder_missing_from_the_class_list(tmp_path):
    write_images(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(InputError, match=r"val/dog: folder is not a class listed in"):
        open_data(tmp_path / "val", preprocess=CONFIG, classes=["cat"])
    with pytest.raises(InputError, match=r"class 'cat' is listed twice"):
        open_data(tmp_path / "val", preprocess=CONFIG, classes=["cat", "dog", "cat"])


def test_hidden_and_non_image_files_are_left_out(tmp_path):
    write_images(tmp_path / "val", {"cat": 2})
    (tmp_path / "val" / "cat" / "notes.txt").write_text("x")
    (tmp_path / "val" / "cat" / "._img00.png").write_bytes(b"\x00\x05")  # macOS resource fork
    (tmp_path / "val" / ".cache").mkdir()
    (tmp_path / "val" / "cat" / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "cat" / "sub" / "deep.PNG")
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    _, _, _, keys = all_batches(source, batch_size=8)
    assert keys == ["cat/img00.png", "cat/img01.png", "cat/sub/deep.PNG"]
    assert source.description["ignored_files"] == 2


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda root: None, "no class subfolders \\(the folder is empty\\)"),
        (lambda root: Image.new("L", (2, 2)).save(root / "a.png"), "holds images but no class"),
        (lambda root: (root / "cat").mkdir(), "no images in its 1 class folder"),
    ],
)
def test_empty_layouts_are_clear_errors(tmp_path, setup, match):
    root = tmp_path / "val"
    root.mkdir()
    setup(root)
    with pytest.raises(InputError, match=match):
        open_data(root, preprocess=CONFIG)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"no such file or folder"):
        open_data(tmp_path / "nothing", preprocess=CONFIG)


@pytest.mark.parametrize(
    "content",
    [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
    ids=["garbage", "truncated-png"],
)
def test_corrupt_image_names_the_file(tmp_path, content):
    write_images(tmp_path / "val", {"cat": 2})
    (tmp_path / "val" / "cat" / "broken.png").write_bytes(content)
    source = open_data(tmp_path / "val", preprocess=CONFIG)
    with pytest.raises(
        InputError, match=r"val/cat/broken.png: cannot decode the image .*--skip-bad"
    ):
        list(source.batches(batch_size=2))


def test_truncated_jpeg_names_the_file(tmp_path):
    write_images(tmp_path / "val", {"cat": 4})
    good = (tmp_path / "val" / "cat" / "img03.jpg").read_bytes()
    (tmp_path / "val" / "cat" / "img03.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=r"img03.jpg: cannot decode the image"):
        list(open_data(tmp_path / "val", preprocess=CONFIG).batches(batch_size=4, workers=1))


def test_skip_bad_records_and_continues(tmp_path):
    keys = write_images(tmp_path / "val", {"cat": 3, "dog": 2})
    (tmp_path / "val" / "cat" / "img01.png").write_bytes(b"garbage")
    (tmp_path / "val" / "dog" / "img00.png").write_bytes(b"garbage")
    source = open_data(tmp_path / "val", preprocess=CONFIG, skip_bad=True)
    assert len(source) == 5
    for workers in (0, 2):
        inputs, labels, indices, got = all_batches(source, batch_size=2, workers=workers)
        good = [k for k in sorted(keys) if k not in ("cat/img01.png", "dog/img00.png")]
        assert got == good
        assert indices.tolist() == [0, 2, 4]
        assert labels.tolist() == [0, 0, 1]
        torch.testing.assert_close(inputs, reference_inputs(tmp_path / "val", good, CONFIG))
    assert [k for k, _ in source.skipped] == ["cat/img01.png", "dog/img00.png"]
    assert all("UnidentifiedImageError" in reason for _, reason in source.skipped)


def test_grayscale_teacher_gets_one_channel(tmp_path):
    write_images(tmp_path / "val", {"a": 4})
    config = PreprocessConfig(input_size=(1, 6, 6), mean=(0.5,), std=(0.5,))
    inputs, *_ = all_batches(open_data(tmp_path / "val", preprocess=config), batch_size=4)
    assert inputs.shape == (4, 1, 6, 6)


# --- checks against the teacher ---------------------------------------------------------------


def test_input_shape_disagreeing_with_the_teacher(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    teacher = SpecOnly(tmp_path / "t.onnx", 2, InputSpec("x", (None, 3, 224, 224), "float32"))
    gray = PreprocessConfig(input_size=(1, 28, 28))
    with pytest.raises(InputError, match=r"t.onnx: expected \(3, 224, 224\) got \(1, 28, 28\)"):
        open_data(tmp_path / "val", preprocess=gray, teacher=teacher)


def test_teacher_input_shape_and_sidecar_are_used(tmp_path):
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    teacher = SpecOnly(tmp_path / "t.onnx", 2, InputSpec("x", (None, 3, 6, 6), "float32"))
    source = open_data(tmp_path / "val", teacher=teacher)
    assert source.config.input_size == (3, 6, 6)
    assert str(source.description["preprocess_from"]).startswith("input shape of t.onnx")
    (tmp_path / "t.preprocess.json").write_text(json.dumps({"input_size": [3, 6, 6], "mean": 0}))
    from calibrate_teacher.teachers import find_model_preprocessing

    layers = find_model_preprocessing(teacher.path)
    source = open_data(tmp_path / "val", teacher=teacher, model_layers=layers, overrides={"crop_pct": 1.0})
    assert source.config.mean == (0.0, 0.0, 0.0)
    assert source.config.crop_pct == 1.0
    assert "t.preprocess.json beside the model" in str(source.description["preprocess_from"])


def test_class_count_disagreeing_with_the_teacher(tmp_path):
    write_images(tmp_path / "val", {str(i): 1 for i in range(12)})
    teacher = SpecOnly(tmp_path / "teacher.onnx", 10, None)
    with pytest.raises(
        InputError, match=r"val/ has 12 classes .* but teacher.onnx outputs 10 logits"
    ):
        open_data(tmp_path / "val", preprocess=CONFIG, teacher=teacher)


# --- array files ------------------------------------------------------------------------------


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((11, 2, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=11).astype(np.int64)
    return inputs, labels


def _write(kind: str, tmp_path: Path, inputs, labels, keys=None) -> Path:
    if kind == ".npz":
        path = tmp_path / "data.npz"
        extra = {"keys": np.array(keys)} if keys is not None else {}
        np.savez(path, inputs=inputs, labels=labels, **extra)
    elif kind == ".safetensors":
        path = tmp_path / "data.safetensors"
        meta = {"keys": json.dumps(keys)} if keys is not None else None
        save_file(
            {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)},
            str(path),
            metadata=meta,
        )
    else:
        path = tmp_path / "data.npy"
        np.save(path, inputs)
        np.save(tmp_path / "data.labels.npy", labels)
    return path


@pytest.mark.parametrize("kind", [".npz", ".safetensors", ".npy"])
@pytest.mark.parametrize("workers", [0, 2])
def test_array_files_round_trip(tmp_path, arrays, kind, workers):
    inputs, labels = arrays
    source = open_data(_write(kind, tmp_path, inputs, labels))
    assert isinstance(source, ArraySource)
    assert len(source) == 11
    got_inputs, got_labels, indices, keys = all_batches(source, batch_size=4, workers=workers)
    torch.testing.assert_close(got_inputs, torch.from_numpy(inputs), atol=0, rtol=0)
    assert got_labels.tolist() == labels.tolist()
    assert keys == [str(i) for i in range(11)]
    assert indices.tolist() == list(range(11))
    order = [7, 8, 9, 2, 10]  # two contiguous runs and a jump
    sub, sub_labels, _, sub_keys = all_batches(source, batch_size=5, indices=order)
    torch.testing.assert_close(sub, torch.from_numpy(inputs[order]), atol=0, rtol=0)
    assert sub_keys == [str(i) for i in order]
    assert sub_labels.tolist() == labels[order].tolist()
    assert source.description["input_shape"] == [2, 3, 3]


@pytest.mark.parametrize("kind", [".npz", ".safetensors"])
def test_array_keys_are_read(tmp_path, arrays, kind):
    inputs, labels = arrays
    keys = [f"s{i}" for i in range(11)]
    source = open_data(_write(kind, tmp_path, inputs, labels, keys=keys))
    assert all_batches(source, batch_size=4)[3] == keys


def test_float64_inputs_become_float32_and_teacher_dtype_wins(tmp_path, arrays):
    inputs, labels = arrays
    path = _write(".npz", tmp_path, inputs.astype(np.float64), labels)
    assert all_batches(open_data(path), batch_size=4)[0].dtype == torch.float32
    teacher = SpecOnly(tmp_path / "t.onnx", 4, InputSpec("x", (None, 2, 3, 3), "float16"))
    assert all_batches(open_data(path, teacher=teacher), batch_size=4)[0].dtype == torch.float16


def test_from_tensors(arrays):
    inputs, labels = (torch.from_numpy(a) for a in arrays)
    source = ArraySource.from_tensors(inputs, labels, keys=[f"k{i}" for i in range(11)])
    got_inputs, _, _, keys = all_batches(source, batch_size=3, indices=[4, 5, 6, 0])
    assert torch.equal(got_inputs, inputs[[4, 5, 6, 0]])
    assert keys == ["k4", "k5", "k6", "k0"]


def test_array_file_errors(tmp_path, arrays):
    inputs, labels = arrays
    np.savez(tmp_path / "no_labels.npz", inputs=inputs)
    with pytest.raises(InputError, match=r"no_labels.npz: missing array\(s\) labels"):
        open_data(tmp_path / "no_labels.npz")
    np.savez(tmp_path / "short.npz", inputs=inputs, labels=labels[:5])
    with pytest.raises(InputError, match=r"labels must have shape \[11\]"):
        open_data(tmp_path / "short.npz")
    np.savez(tmp_path / "float_labels.npz", inputs=inputs, labels=labels.astype(np.float32))
    with pytest.raises(InputError, match=r"labels must be integers"):
        open_data(tmp_path / "float_labels.npz")
    np.save(tmp_path / "lonely.npy", inputs)
    with pytest.raises(InputError, match=r"lonely.npy: .npy inputs need a labels file"):
        open_data(tmp_path / "lonely.npy")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02junk")
    with pytest.raises(InputError, match=r"junk.safetensors: cannot be read as .safetensors"):
        open_data(tmp_path / "junk.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(InputError, match=r"junk.npz: cannot be read as .npz arrays"):
        open_data(tmp_path / "junk.npz")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY junk")
    with pytest.raises(InputError, match=r"junk.npy: cannot be read as .npy arrays"):
        open_data(tmp_path / "junk.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match=r"unknown array file type .csv"):
        open_data(tmp_path / "x.csv")


def test_array_checks_against_the_teacher(tmp_path, arrays):
    inputs, labels = arrays
    path = _write(".npz", tmp_path, inputs, labels)
    wrong_shape = SpecOnly(tmp_path / "t.onnx", 4, InputSpec("x", (None, 3, 3, 3), "float32"))
    with pytest.raises(InputError, match=r"expected \(3, 3, 3\) got \(2, 3, 3\)"):
        open_data(path, teacher=wrong_shape)
    few_classes = SpecOnly(tmp_path / "t.onnx", int(labels.max()), None)
    with pytest.raises(InputError, match=f"labels go up to {labels.max()} but t.onnx outputs"):
        open_data(path, teacher=few_classes)
    with pytest.raises(InvalidValueError, match=r"preprocessing options apply to image folders"):
        open_data(path, overrides={"crop_pct": 1.0})
    assert open_data(path, overrides={"crop_pct": None}).num_classes is None
