"""COCO data source and detection preprocessing (#14): parsing, safety, letterbox, the map back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _coco_fixtures import CLASS_NAMES, standard_images, write_coco
from PIL import Image

from calibrate_teacher.detection._transform import (
    DetectionPreprocess,
    letterbox_geometry,
    parse_detection_preprocess,
    preprocess_detection_image,
)
from calibrate_teacher.detection.base import DetectionBatch, Detections, ImageTransform, to_original
from calibrate_teacher.detection.coco import open_coco
from calibrate_teacher.errors import InputError, InvalidValueError

LB64 = {"mode": "letterbox", "input_size": [64, 64]}


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


# --- parsing -----------------------------------------------------------------------------------


def test_non_contiguous_ids_in_id_order(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    src = open_coco(ann, images=tmp_path / "images", preprocess=LB64)
    # the file lists 7 green, 3 red, 11 blue: id order gives red, green, blue
    assert src.class_names == ("red", "green", "blue")
    assert src.category_ids == (3, 7, 11)
    assert "id order" in src.description["classes_from"]
    assert any("no class list given" in n for n in src.notes)
    gt = src.ground_truth(0)
    assert gt.labels.tolist() == [0, 1]
    assert gt.boxes.tolist() == [[4, 6, 16, 16], [22, 12, 36, 26]]  # xywh -> xyxy
    assert len(src) == 4 and src.image_id(3) == 103


def test_file_order_and_class_names(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    src = open_coco(ann, preprocess=LB64, category_order="file")
    assert src.class_names == ("green", "red", "blue") and src.category_ids == (7, 3, 11)
    model_order = ("blue", "red", "green", "unused")
    src = open_coco(ann, preprocess=LB64, classes=model_order, classes_origin="the ONNX names")
    assert src.category_ids == (11, 3, 7, -1)
    assert src.ground_truth(0).labels.tolist() == [1, 2]
    assert src.description["classes_from"] == "the ONNX names"
    assert any("1 of the model's 4 classes" in n for n in src.notes)
    with pytest.raises(InputError, match="'blue'"):
        open_coco(ann, preprocess=LB64, classes=("red", "green"))


def test_crowd_is_kept_as_crowd(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    src = open_coco(ann, preprocess=LB64)
    gt = src.ground_truth(2)
    assert gt.crowd.tolist() == [False, True]
    assert src.description["num_crowd"] == 1
    coco = src.coco_ground_truth()
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 0, 0, 0, 1]
    assert {c["id"] for c in coco["categories"]} == {3, 7, 11}


def test_missing_file_named_and_skipped(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    os.remove(tmp_path / "images" / "img001.png")
    with pytest.raises(InputError, match=r"img001\.png: no such image file"):
        open_coco(ann, preprocess=LB64)
    src = open_coco(ann, preprocess=LB64, skip_bad=True)
    assert len(src) == 3 and src.skipped[0][0] == "img001.png"


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_unsafe_file_names_refused(tmp_path, name):
    ann = write_coco(tmp_path / "d", standard_images())
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    _edit(ann, lambda d: d["images"][1].update(file_name=name))
    with pytest.raises(InputError, match="image 101"):
        open_coco(ann, images=tmp_path / "d" / "images", preprocess=LB64)
    src = open_coco(ann, images=tmp_path / "d" / "images", preprocess=LB64, skip_bad=True)
    assert len(src) == 3


def test_symlink_out_of_the_folder_refused(tmp_path):
    ann = write_coco(tmp_path / "d", standard_images())
    Image.new("RGB", (36, 36)).save(tmp_path / "secret.png")
    (tmp_path / "d" / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "d" / "images" / "inside.png").symlink_to(tmp_path / "d" / "images" / "img001.png")
    _edit(ann, lambda d: d["images"][1].update(file_name="link.png"))
    with pytest.raises(InputError, match="symlink pointing outside"):
        open_coco(ann, preprocess=LB64)
    _edit(ann, lambda d: d["images"][1].update(file_name="inside.png"))
    assert len(open_coco(ann, preprocess=LB64)) == 4  # a link inside the folder is fine


def test_bad_annotations(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    _edit(ann, lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5]))
    with pytest.raises(InputError, match=r"annotation 1: bbox \[1, 1, 0, 5\] has a width or height <= 0"):
        open_coco(ann, preprocess=LB64)
    src = open_coco(ann, preprocess=LB64, skip_bad=True)
    assert src.ground_truth(0).labels.tolist() == [1] and src.skipped[0][0] == "annotation 1"
    _edit(ann, lambda d: (d["annotations"][0].update(bbox=[1, 1, 2, 5]), d["annotations"][1].pop("category_id")))
    with pytest.raises(InputError, match="annotation 2: lacks category_id"):
        open_coco(ann, preprocess=LB64)
    _edit(ann, lambda d: d.pop("categories"))
    with pytest.raises(InputError, match="missing the list 'categories'"):
        open_coco(ann, preprocess=LB64)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match=r"broken\.json: cannot read"):
        open_coco(tmp_path / "broken.json", images=tmp_path / "images")


def test_one_folder_layout(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    write_coco(root, standard_images(), json_name="annotations/instances_val.json", image_dir="images/val2017")
    src = open_coco(root, preprocess=LB64)
    assert src.path == root / "annotations" / "instances_val.json"
    assert src.images == root / "images" / "val2017"
    # a second copy of the images makes the folder ambiguous: both are listed
    (root / "images" / "copy").mkdir()
    for f in (root / "images" / "val2017").iterdir():
        (root / "images" / "copy" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match=r"several folders hold 'img000\.png'.*copy.*val2017"):
        open_coco(root, preprocess=LB64)
    (root / "other.json").write_text("{}")
    with pytest.raises(InputError, match="several annotation files"):
        open_coco(root, preprocess=LB64)


def test_batches_and_size_mismatch(tmp_path):
    ann = write_coco(tmp_path, standard_images())
    src = open_coco(ann, preprocess=LB64)
    batches = list(src.batches(batch_size=3))
    assert [len(b.image_ids) for b in batches] == [3, 1]
    b = batches[0]
    assert isinstance(b, DetectionBatch) and b.images.shape == (3, 3, 64, 64) and b.images.dtype == torch.float32
    assert b.image_ids == (100, 101, 102) and b.transforms[0].width == 40
    _edit(ann, lambda d: d["images"][0].update(width=41))
    with pytest.raises(InputError, match="41x30"):
        list(open_coco(ann, preprocess=LB64).batches(batch_size=2))
    src = open_coco(ann, preprocess=LB64, skip_bad=True)
    assert sum(len(b.image_ids) for b in src.batches(batch_size=2)) == 3 and len(src.skipped) == 1


def test_workers_give_the_same_batches(tmp_path):
    src = open_coco(write_coco(tmp_path, standard_images()), preprocess=LB64)
    a = list(src.batches(batch_size=2))
    b = list(src.batches(batch_size=2, workers=2))
    assert all(torch.equal(x.images, y.images) and x.image_ids == y.image_ids for x, y in zip(a, b, strict=True))


# --- preprocessing -----------------------------------------------------------------------------


def test_preprocess_defaults_are_named(tmp_path):
    cfg, defaulted = parse_detection_preprocess(None)
    assert cfg == DetectionPreprocess() and defaulted == ("mode", "input_size")
    src = open_coco(write_coco(tmp_path, standard_images()))
    assert src.description["preprocess_from"] == "defaults"
    assert any("mode, input_size not given" in n for n in src.notes)
    cfg, defaulted = parse_detection_preprocess({"mode": "resize", "input_size": [32, 48]})
    assert defaulted == ("mean", "std") and cfg.input_size == (32, 48)
    with pytest.raises(InvalidValueError, match="unknown key"):
        parse_detection_preprocess({"mode": "letterbox", "pad": 0})
    with pytest.raises(InvalidValueError, match="letterbox divides by 255"):
        parse_detection_preprocess({"mode": "letterbox", "mean": [0.5, 0.5, 0.5]})


def _ultralytics_geometry(w, h, out_h, out_w):
    # ultralytics LetterBox(auto=False, center=True): the arithmetic written out by hand
    r = min(out_h / h, out_w / w)
    new_unpad = int(round(w * r)), int(round(h * r))  # noqa: RUF046
    dw, dh = (out_w - new_unpad[0]) / 2, (out_h - new_unpad[1]) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))  # noqa: RUF046
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))  # noqa: RUF046
    return r, new_unpad, (top, bottom, left, right)


@pytest.mark.parametrize(
    ("w", "h", "out"), [(4, 4, (5, 8)), (5, 3, (7, 9)), (500, 375, (640, 640)), (37, 91, (64, 48))]
)
def test_letterbox_geometry_matches_ultralytics(w, h, out):
    r, new_unpad, (top, bottom, left, right) = _ultralytics_geometry(w, h, *out)
    size, t = letterbox_geometry(w, h, out)
    assert size == new_unpad and (t.scale_x, t.scale_y) == (r, r) and (t.pad_x, t.pad_y) == (left, top)
    assert top + new_unpad[1] + bottom == out[0] and left + new_unpad[0] + right == out[1]


def test_letterbox_hand_computed():
    # 4x4 image into H=5, W=8: r = 1.25, resized 5x5, dw = 1.5 -> left 1, right 2; dh = 0
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    x, t = preprocess_detection_image(image, DetectionPreprocess(input_size=(5, 8)))
    expected = np.full((3, 5, 8), 114 / 255, dtype=np.float32)
    expected[:, :, 1:6] = (np.array([10, 20, 30], dtype=np.float32) / 255)[:, None, None]
    assert x.shape == (3, 5, 8)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-7)
    assert t == ImageTransform(scale_x=1.25, scale_y=1.25, pad_x=1.0, pad_y=0.0, width=4, height=4)


def test_resize_normalise_hand_computed():
    image = Image.new("RGB", (6, 3), (51, 102, 204))
    cfg = DetectionPreprocess(mode="resize", input_size=(4, 4), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    x, t = preprocess_detection_image(image, cfg)
    want = (np.array([0.2, 0.4, 0.8]) - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.5, 0.25])
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(want[:, None, None], (3, 4, 4)), atol=1e-6)
    assert (t.scale_x, t.scale_y, t.pad_x, t.pad_y) == (4 / 6, 4 / 3, 0.0, 0.0)


@pytest.mark.parametrize("mode", ["letterbox", "resize"])
@pytest.mark.parametrize(("w", "h"), [(40, 30), (31, 77), (640, 427)])
def test_to_original_inverts_the_transform(mode, w, h):
    kw = {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)} if mode == "resize" else {}
    _, t = preprocess_detection_image(
        Image.new("RGB", (w, h)), DetectionPreprocess(mode=mode, input_size=(64, 96), **kw)
    )
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (20, 2)) * [w / 2, h / 2]
    original = torch.tensor(
        np.concatenate([xy, xy + rng.uniform(1, 1, (20, 2)) * [w / 2, h / 2]], 1), dtype=torch.float32
    )
    scale = torch.tensor([t.scale_x, t.scale_y] * 2)
    pad = torch.tensor([t.pad_x, t.pad_y] * 2)
    det = Detections(boxes=original * scale + pad, logits=torch.zeros(20, 3), head="sigmoid", background="none")
    back = to_original(det, t).boxes
    torch.testing.assert_close(back, original, atol=1e-4, rtol=0)


def test_classes_are_the_fixture_names(tmp_path):
    src = open_coco(write_coco(tmp_path, standard_images()), classes=CLASS_NAMES, preprocess=LB64)
    assert src.category_ids == (3, 7, 11)
