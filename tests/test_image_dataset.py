"""ImageFolderDataset pairs an image folder with the soft-label cache exported from it (issue #10, item 9)."""

from __future__ import annotations

import json
import pickle

import _teacher_fixtures as fx
import numpy as np
import pytest
import torch
from PIL import Image

from calibrate_teacher.data import ImageFolderSource, PreprocessConfig
from calibrate_teacher.data.dataset import ImageFolderDataset
from calibrate_teacher.data.transform import preprocess_image
from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.soft_labels import SoftLabelCache, SoftLabelDataset

T = 1.7
CLASSES = ("ant", "bee", "cat", "dog", "eel")  # five, as the tiny conv teacher outputs
PREPROCESS = {
    "input_size": [3, 8, 8],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": [0.5, 0.4, 0.3],
    "std": [0.25, 0.2, 0.3],
}


def _write_images(root):
    rng = np.random.default_rng(0)
    keys = []
    for c, name in enumerate(CLASSES):
        for j in range(3):
            sub = f"{name}/deep" if (c, j) == (1, 2) else name  # a nested folder, too
            key = f"{sub}/{name}_{2 - j}.png"  # names that sort against their writing order
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(6, 20, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / key)
            keys.append(key)
    (root / "ant" / "notes.txt").write_text("not an image")
    return keys


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_dataset")
    train = folder / "train"
    _write_images(train)
    module = fx.tiny_conv()
    teacher = fx.save_torchscript(module, folder / "teacher.pt")
    preprocess = folder / "preprocess.json"
    preprocess.write_text(json.dumps(PREPROCESS))
    return {"module": module, "teacher": teacher, "train": train, "cache": folder / "cache",
            "preprocess": preprocess}


@pytest.fixture(scope="module")
def cache(exported):
    from calibrate_teacher.cli import main

    args = ["export-soft-labels", exported["teacher"], "--data", exported["train"], "--out", exported["cache"],
            "--preprocess", exported["preprocess"], "-t", T, "--shard-rows", 4, "--batch-size", 3,
            "--device", "cpu"]
    with pytest.raises(SystemExit) as done:  # the CLI is how a user makes the cache
        main([str(a) for a in args])
    assert done.value.code in (0, None)
    return SoftLabelCache(exported["cache"])


def test_rows_pair_with_images_and_soft_labels_are_teacher_logits_over_t(exported, cache):
    preprocess = cache.manifest.data["source"]["preprocess"]  # what the export used
    data = ImageFolderDataset(exported["train"], preprocess=preprocess)
    assert data.keys == cache.keys and len(data) == len(cache) == 15
    assert list(data.labels) == cache.labels.tolist()
    paired = SoftLabelDataset(data, cache, keys=data.keys)  # checks keys, and labels per item
    for i in range(len(paired)):
        image, label, soft = paired[i]
        assert image.shape == (3, 8, 8) and label == data.labels[i]
        with torch.no_grad():
            expected = exported["module"](image[None])[0] / T
        torch.testing.assert_close(soft, expected, atol=3e-3, rtol=1e-3)  # float16 storage


def test_order_and_keys_are_exactly_the_image_folder_source(exported):
    config = PreprocessConfig.from_dict(PREPROCESS, source="test")
    for classes in (None, ["eel", "dog", "cat", "bee", "ant", "fox"]):  # "fox": a class with no folder
        source = ImageFolderSource(exported["train"], config=config, class_names=classes)
        data = ImageFolderDataset(exported["train"], preprocess=config, classes=classes)
        assert data.keys == tuple(source.key(i) for i in range(len(source)))
        assert data.class_names == source.class_names
        batch = next(iter(source.batches(batch_size=len(source))))
        assert list(data.labels) == batch.labels.tolist() and list(batch.keys) == list(data.keys)
        torch.testing.assert_close(torch.stack([data[i][0] for i in range(len(data))]), batch.inputs)
    assert ImageFolderDataset(exported["train"], preprocess=config).keys[:3] == (
        "ant/ant_0.png", "ant/ant_1.png", "ant/ant_2.png",
    )


def test_class_list_file_in_the_folder_is_used(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    data = ImageFolderDataset(tmp_path, preprocess=PREPROCESS)
    assert data.class_names == tuple(reversed(CLASSES)) and data.keys[0].startswith("eel/")
    listed = tmp_path / "order.txt"
    listed.write_text("\n".join(CLASSES))
    assert ImageFolderDataset(tmp_path, preprocess=PREPROCESS, classes=listed).keys[0].startswith("ant/")


def _flip_then_preprocess(image):
    # a stand-in for training augmentations: takes a PIL image (module level: workers pickle it)
    config = PreprocessConfig.from_dict(PREPROCESS, source="test")
    return preprocess_image(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), config)


def test_dataloader_with_two_workers_over_the_paired_dataset(exported, cache):
    data = ImageFolderDataset(exported["train"], transform=_flip_then_preprocess)
    clone = pickle.loads(pickle.dumps(data))  # what a spawned worker receives
    assert clone.keys == data.keys
    paired = SoftLabelDataset(data, cache, keys=data.keys)
    loader = torch.utils.data.DataLoader(paired, batch_size=4, num_workers=2)
    images, labels, soft = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert images.shape == (15, 3, 8, 8)
    assert labels.tolist() == list(data.labels)
    torch.testing.assert_close(soft, cache.logits()[:])
    flipped = _flip_then_preprocess(Image.open(exported["train"] / data.keys[5]))
    torch.testing.assert_close(images[5], flipped)


def test_items_without_transform_or_preprocess_are_pil_images(exported):
    data = ImageFolderDataset(exported["train"])
    image, label = data[-1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 4
    assert data[-1][1] == data[len(data) - 1][1]
    with pytest.raises(IndexError):
        data[len(data)]
    assert "15 images, 5 classes, raw PIL images" in repr(data)


def test_bad_arguments_and_bad_images_are_one_line_errors(tmp_path, exported):
    with pytest.raises(InvalidValueError, match="not both"):
        ImageFolderDataset(exported["train"], transform=_flip_then_preprocess, preprocess=PREPROCESS)
    with pytest.raises(InputError, match="no such folder"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(InputError, match="no such class list"):
        ImageFolderDataset(exported["train"], classes=tmp_path / "missing.txt")
    with pytest.raises(InputError, match="unknown preprocessing key"):
        ImageFolderDataset(exported["train"], preprocess={"input_size": [3, 8, 8], "crop": 1.0})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    data = ImageFolderDataset(tmp_path, preprocess=PREPROCESS)  # the scan does not decode
    with pytest.raises(InputError, match=r"broken\.png: cannot decode the image") as err:
        data[0]
    assert "\n" not in str(err.value)
