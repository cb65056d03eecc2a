"""COCO-format detection data: an annotation json and its image folder, read without pycocotools.

Layout: ``open_coco("annotations.json", images="images/")``, or one folder holding both
(``open_coco("coco/")``): the json is the one ``*.json`` file in the folder or in its
``annotations/`` subfolder, the image folder is whichever of the folder, its subfolders and the
subfolders of its ``images/`` holds the annotated files; more than one candidate is an error
listing them (pass the file or ``images`` explicitly).

Classes: a COCO category id becomes the model's foreground class index (0..C-1). With
``classes`` (names in model order: the ONNX ``names`` metadata, a class list, the teacher's
class names), each category is mapped by its name, and a category the list lacks is an error;
without, the json's categories in id order (``category_order="id"``, COCO's own convention) or
file order are the model's classes. ``description["classes_from"]`` says which.

Ground truth: ``bbox`` is ``[x, y, w, h]`` in pixels (``xyxy`` in :class:`GroundTruth`);
``iscrowd`` regions are kept as ``crowd`` and are never targets: a detection matched to one is
ignored, as COCO's evaluator does. Boxes with ``w <= 0`` or ``h <= 0``, missing keys, unknown
image or category ids are errors naming the annotation (``skip_bad``: skipped and recorded).

Safety: a ``file_name`` is read only inside the image folder: absolute paths, ``..`` parts and
symlinks whose target lies outside the folder are refused; only regular files are opened.
Images are decoded per batch (memory flat in N), optionally in DataLoader worker processes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from calibrate_teacher.detection._coco_files import find_annotations, find_images, safe_path
from calibrate_teacher.detection._coco_source import Annotation, CocoSource
from calibrate_teacher.detection._transform import DetectionPreprocess, parse_detection_preprocess
from calibrate_teacher.detection.base import BackgroundLayout
from calibrate_teacher.errors import InputError, InvalidValueError

__all__ = ["CocoSource", "open_coco"]

CategoryOrder = Literal["id", "file"]
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("image_id", "category_id", "bbox")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _map_categories(
    path: Path, raw_categories: list[object], classes: Sequence[str] | None, classes_origin: str, category_order: str
) -> tuple[tuple[str, ...], dict[int, int], list[int], str, list[str]]:
    """(class names, category id -> class, class -> category id (-1: none), where the classes came from, notes)."""
    notes: list[str] = []
    cats: list[tuple[int, str]] = []
    for i, cat in enumerate(raw_categories):
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise InputError(f"{path}: category #{i} lacks an integer 'id' or a string 'name'")
        cats.append((cat["id"], cat["name"]))
    if len({c for c, _ in cats}) != len(cats):
        raise InputError(f"{path}: category ids repeat; each category needs its own id")
    ordered = sorted(cats) if category_order == "id" else cats
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if not names or len(set(names)) != len(names):
            raise InvalidValueError(f"classes ({classes_origin}): expected unique class names, got {len(names)} names")
        position = {name: i for i, name in enumerate(names)}
        json_names = [n for _, n in cats]
        if len(set(json_names)) != len(json_names):
            raise InputError(f"{path}: category names repeat, so they cannot be mapped to {classes_origin} by name")
        missing = [n for _, n in ordered if n not in position]
        if missing:
            raise InputError(
                f"{path}: categories {', '.join(map(repr, missing[:5]))} are not among the model's classes "
                f"({classes_origin}); pass the model's class list, or remove those categories"
            )
        label_of = {cid: position[name] for cid, name in cats}
        category_ids = [-1] * len(names)
        for cid, name in cats:
            category_ids[position[name]] = cid
        origin = classes_origin
        unmatched = category_ids.count(-1)
        if unmatched:
            notes.append(f"{unmatched} of the model's {len(names)} classes have no category in {path.name}")
    else:
        names = tuple(n for _, n in ordered)
        label_of = {cid: i for i, (cid, _) in enumerate(ordered)}
        category_ids = [cid for cid, _ in ordered]
        origin = f"the json's categories in {category_order} order"
        notes.append(
            f"classes: no class list given; model class i is the json's i-th category in {category_order} order; "
            "pass the model's class names if it was trained with another order"
        )
    return names, label_of, category_ids, origin, notes


def _read_annotations(
    raw: list[object],
    index_of: dict[int, int],
    dropped: set[int],
    label_of: dict[int, int],
    problem: Callable[[str, str], None],
) -> tuple[list[list[Annotation]], int]:
    """Per image, its validated boxes (xyxy, class, crowd, area); also the number of crowd regions."""
    per_image: list[list[Annotation]] = [[] for _ in index_of]
    num_crowd = 0
    for i, ann in enumerate(raw):
        what = f"annotation {ann.get('id', f'#{i}') if isinstance(ann, dict) else f'#{i}'}"
        if not isinstance(ann, dict) or any(k not in ann for k in _ANNOTATION_KEYS):
            lacking = [k for k in _ANNOTATION_KEYS if not isinstance(ann, dict) or k not in ann]
            problem(what, f"lacks {', '.join(lacking)}")
            continue
        image_id, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
        if not _integer(image_id) or not _integer(cid):
            problem(what, f"image_id {image_id!r} and category_id {cid!r} must be integers")
            continue
        if image_id in dropped:
            continue
        if image_id not in index_of:
            problem(what, f"image_id {image_id!r} is not among the images")
            continue
        if cid not in label_of:
            problem(what, f"category_id {cid!r} is not among the categories")
            continue
        values = [_number(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else [None]
        if any(v is None for v in values):
            problem(what, f"bbox {bbox!r} is not [x, y, w, h] of 4 finite numbers")
            continue
        x, y, w, h = (float(v) for v in values)  # type: ignore[arg-type]
        if w <= 0 or h <= 0:
            problem(what, f"bbox {bbox!r} has a width or height <= 0")
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            problem(what, f"iscrowd {crowd!r} is not 0 or 1")
            continue
        area = _number(ann.get("area"))
        num_crowd += bool(crowd)
        per_image[index_of[image_id]].append(
            (x, y, x + w, y + h, label_of[cid], bool(crowd), area if area is not None else w * h)
        )
    return per_image, num_crowd


def open_coco(
    annotations: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    classes_origin: str = "the given class list",
    background: BackgroundLayout | None = None,
    preprocess: Mapping[str, object] | DetectionPreprocess | None = None,
    preprocess_origin: str = "given",
    category_order: CategoryOrder = "id",
    skip_bad: bool = False,
) -> CocoSource:
    """Open a COCO-format detection dataset.

    Args:
        annotations: The annotation json, or a folder holding it and the images.
        images: The image folder (default: found beside the json, see the module docstring).
        classes: Class names in the model's order; None to use the json's categories.
        classes_origin: Where ``classes`` came from, for the description and messages.
        background: The teacher's background layout, where the caller knows it (recorded).
        preprocess: A preprocess spec (``mode``, ``input_size``, ``mean``, ``std``); keys it lacks
            take defaults, named in ``notes``.
        preprocess_origin: Where ``preprocess`` came from.
        category_order: Without ``classes``: model classes in category ``id`` order or ``file`` order.
        skip_bad: Skip (and record) bad annotations and missing or unsafe image files.

    Returns:
        A :class:`CocoSource`.

    Raises:
        InputError: the json is missing, unreadable or malformed, or refers to files that are
            missing or outside the image folder (without ``skip_bad``); the folder layout is
            ambiguous; a category is not in ``classes``.
        InvalidValueError: bad options.
    """
    if background not in (None, "first", "last", "none"):
        raise InvalidValueError(f"background: expected first, last or none, got {background!r}")
    if category_order not in ("id", "file"):
        raise InvalidValueError(f"category_order: expected id or file, got {category_order!r}")
    given = Path(annotations)
    if given.is_dir():
        path, bases = find_annotations(given), [given]
    elif given.is_file():
        path = given
        bases = [given.parent] + ([given.parent.parent] if given.parent.name == "annotations" else [])
    else:
        raise InputError(f"{given}: no such annotation file or folder")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the COCO annotations ({exc})") from exc
    if not isinstance(document, dict):
        raise InputError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise InputError(f"{path}: missing the list {key!r}; a COCO file has images, annotations and categories")
    config, defaulted = parse_detection_preprocess(preprocess)
    notes: list[str] = []
    if defaulted:
        notes.append(
            f"preprocessing: {', '.join(defaulted)} not given, using the default(s) "
            f"{ {k: config.to_json()[k] for k in defaulted} }; pass a preprocess spec (or a sidecar) to set them"
        )
    skipped: list[tuple[str, str]] = []

    def problem(what: str, reason: str) -> None:
        if not skip_bad:
            raise InputError(f"{path}: {what}: {reason}; fix the annotation file, or pass --skip-bad to skip it")
        skipped.append((what, reason))

    names, label_of, category_ids, origin, class_notes = _map_categories(
        path, document["categories"], classes, classes_origin, category_order
    )
    notes += class_notes

    # Images.
    image_rows: list[dict[str, object]] = []
    seen: set[int] = set()
    for i, image in enumerate(document["images"]):
        if not isinstance(image, dict) or any(k not in image for k in _IMAGE_KEYS):
            lacking = [k for k in _IMAGE_KEYS if not isinstance(image, dict) or k not in image]
            problem(f"image #{i}", f"lacks {', '.join(lacking)}")
            continue
        if not (isinstance(image["id"], int) and _positive_int(image["width"]) and _positive_int(image["height"])):
            problem(f"image {image.get('id')!r}", "id, width and height must be integers (width, height > 0)")
            continue
        if image["id"] in seen:
            raise InputError(f"{path}: image id {image['id']} appears twice; image ids must be unique")
        seen.add(image["id"])
        image_rows.append(image)
    if not image_rows:
        raise InputError(f"{path}: no usable images listed")
    first = next((r["file_name"] for r in image_rows if isinstance(r["file_name"], str)), "")
    root = find_images(bases, str(first), Path(images) if images is not None else None)
    real_root = os.path.realpath(root)
    files: list[str] = []
    ids: list[int] = []
    sizes: list[tuple[int, int]] = []
    index_of: dict[int, int] = {}
    dropped: set[int] = set()
    for image in image_rows:
        rel, why = safe_path(root, real_root, image["file_name"])
        image_id = int(image["id"])  # type: ignore[call-overload]
        if rel is None:
            if not skip_bad:
                raise InputError(
                    f"{path}: image {image_id}: {why}; fix the file_name or the image folder, or pass --skip-bad"
                )
            skipped.append((str(image["file_name"]), why))
            dropped.add(image_id)
            continue
        index_of[image_id] = len(files)
        files.append(rel)
        ids.append(image_id)
        sizes.append((int(image["width"]), int(image["height"])))  # type: ignore[call-overload]
    if not files:
        raise InputError(f"{path}: none of the listed images can be read; the first: {skipped[0][1]}")

    per_image, num_crowd = _read_annotations(document["annotations"], index_of, dropped, label_of, problem)
    description: dict[str, object] = {
        "kind": "coco",
        "path": str(path),
        "images": str(root),
        "num_images": len(files),
        "num_annotations": sum(len(a) for a in per_image),
        "num_crowd": num_crowd,
        "num_classes": len(names),
        "classes": list(names),
        "classes_from": origin,
        "category_ids": list(category_ids),
        "background": background if background is not None else "not stated (the teacher's)",
        "preprocess": config.to_json(),
        "preprocess_from": "defaults" if len(defaulted) == 2 else preprocess_origin,
        "preprocess_defaults": list(defaulted),
    }
    return CocoSource(
        path,
        root,
        files=tuple(files),
        image_ids=tuple(ids),
        sizes=tuple(sizes),
        annotations=tuple(tuple(a) for a in per_image),
        class_names=names,
        category_ids=tuple(category_ids),
        background=background,
        config=config,
        notes=notes,
        description=description,
        skipped=skipped,
        skip_bad=skip_bad,
    )
