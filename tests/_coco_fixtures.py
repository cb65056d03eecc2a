"""COCO folders written in tmp_path, and a deterministic fake detection teacher that reads them.

Images are black with solid rectangles: red (class index 0), green (1), blue (2). The fake
teacher finds each colour's rectangle in its input (letterboxed or resized) and returns it as a
candidate with fixed class logits, plus one distractor box at the input's top-left corner, so
the true positives and false positives of a run are known by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from calibrate_teacher.detection.base import Detections

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
#: (category id, name) written to the json, in *file* order (ids not contiguous, not sorted).
CATEGORIES = ((7, "green"), (3, "red"), (11, "blue"))
#: model class index -> colour index (classes in id order: red(3), green(7), blue(11)).
CLASS_NAMES = ("red", "green", "blue")


def write_coco(root: Path, images: list[dict], *, json_name: str = "instances.json", image_dir: str = "images") -> Path:
    """Write PNGs and a COCO json; ``images``: dicts with size (w, h) and objs [(class, x, y, w, h, crowd)]."""
    folder = root / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    cat_id = {name: cid for cid, name in CATEGORIES}
    doc = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in CATEGORIES]}
    ann_id = 1
    for i, spec in enumerate(images):
        w, h = spec["size"]
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        for cls, x, y, bw, bh, crowd in spec.get("objs", []):
            pixels[y : y + bh, x : x + bw] = COLOURS[cls]
            doc["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": 100 + i,
                    "category_id": cat_id[CLASS_NAMES[cls]],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": int(crowd),
                }
            )
            ann_id += 1
        name = spec.get("file_name", f"img{i:03d}.png")
        Image.fromarray(pixels).save(folder / name)
        doc["images"].append({"id": 100 + i, "file_name": name, "width": w, "height": h})
    path = root / json_name
    path.write_text(json.dumps(doc))
    return path


def standard_images() -> list[dict]:
    """Four images of odd sizes; one crowd region; one image without objects."""
    return [
        {"size": (40, 30), "objs": [(0, 4, 6, 12, 10, False), (1, 22, 12, 14, 14, False)]},
        {"size": (36, 36), "objs": [(2, 10, 10, 16, 12, False)]},
        {"size": (50, 24), "objs": [(0, 30, 4, 16, 16, False), (1, 2, 2, 10, 8, True)]},
        {"size": (32, 40), "objs": []},
    ]


@dataclass
class FakeDetector:
    """A DetectionTeacher that finds coloured rectangles.

    ``hit_logit[c]``: the logit of the found class (other classes get ``miss_logit``);
    the distractor at the input's corner gets ``distractor_logit`` on class 0.
    """

    head: str = "sigmoid"
    background: str = "none"
    hit_logit: tuple[float, ...] = (3.0, 2.0, 1.0)
    miss_logit: float = -4.0
    distractor_logit: float = 1.5
    objectness: float | None = None
    nms_applied: bool = False
    duplicate: bool = True
    path: Path = Path("fake.onnx")
    format: str = "fake"
    num_classes: int = 3
    class_names: tuple[str, ...] | None = CLASS_NAMES
    input_spec: object = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def _row(self, cls: int | None) -> list[float]:
        row = [self.miss_logit] * self.num_classes
        if cls is None:
            row[0] = self.distractor_logit
        else:
            row[cls] = self.hit_logit[cls]
        if self.head == "softmax":
            bg = 0.0
            row = [bg, *row] if self.background == "first" else [*row, bg]
        return row

    def detect(self, images: torch.Tensor) -> list[Detections]:
        out = []
        for x in images:
            boxes, rows = [], []
            for cls in range(3):
                others = [c for c in range(3) if c != cls]
                mask = (x[cls] > 0.7) & (x[others[0]] < 0.3) & (x[others[1]] < 0.3)
                if not mask.any():
                    continue
                ys, xs = mask.nonzero(as_tuple=True)
                box = [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
                boxes.append(box)
                rows.append(self._row(cls))
                if self.duplicate:  # a shifted copy with a lower score, for NMS to remove
                    boxes.append([box[0] + 1, box[1], box[2] + 1, box[3]])
                    rows.append([v - 0.5 for v in self._row(cls)])
            boxes.append([0.0, 0.0, 6.0, 6.0])
            rows.append(self._row(None))
            obj = None
            if self.objectness is not None:
                obj = torch.full((len(boxes),), self.objectness)
            out.append(
                Detections(
                    boxes=torch.tensor(boxes),
                    logits=torch.tensor(rows),
                    head=self.head,  # type: ignore[arg-type]
                    background=self.background,
                    objectness=obj,
                    nms_applied=self.nms_applied,  # type: ignore[arg-type]
                )
            )
        return out
