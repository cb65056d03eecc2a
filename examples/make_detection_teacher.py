"""Build the example detection teacher in examples/detection/: a tiny, moderately overconfident detector.

Writes, under ``--out`` (default ``examples/detection``):

- ``coco/images/*.png`` + ``coco/annotations.json``: 64 x 64 synthetic validation images, each with
  1-3 non-overlapping filled shapes of three classes (red ``square``, green ``disc``, blue
  ``bar``) on grey noise, annotated in COCO format with the shapes' tight pixel boxes (category
  ids 1, 3, 7: not contiguous, as in COCO);
- ``detector.onnx``: an anchor-free dense detector (a stride-8 grid of cells, each with class
  logits and ``ltrb`` box distances) exported in ultralytics' YOLOv8 layout: input ``images``
  ``[1, 3, 64, 64]``, output ``output0`` ``[1, 4 + C, N]`` = ``Concat(cx cy w h, Sigmoid(cls))``,
  with ultralytics' ``metadata_props`` (``names``, ``imgsz``, ``task: detect``, ``stride``).

The detector is trained with Adam on separately rendered training images, its class scores
against IoU-aware targets (a positive cell's target is the IoU of its box with the object, as in
ultralytics' task-aligned and VarifocalNet's losses), so that a score tracks how well the box
fits. Then its class layer is multiplied by ``SHARPEN`` (4), as a teacher trained on towards
certainty would be: its detections are more confident than they are precise, and
``calibrate-teacher fit`` finds T near 2 (in the paper's robust 1.5-3.0). Seeded; about a
minute on two CPU cores. The graph is written node by node from the trained weights (no exporter needed), in the
shape ultralytics' exporter writes.

    python examples/make_detection_teacher.py --overwrite
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SIZE, STRIDE = 64, 8
GRID = SIZE // STRIDE
CELLS = GRID * GRID
CLASS_NAMES = ("square", "disc", "bar")
CATEGORY_IDS = (1, 3, 7)
NUM_CLASSES = len(CLASS_NAMES)
FEATURES = 16
#: The trained class layer is multiplied by this, as if trained on to certainty: over-confident.
SHARPEN = 4.0
TRAIN_IMAGES, VAL_IMAGES = 192, 80
STEPS, BATCH = 400, 32
OPSET, IR_VERSION = 17, 9
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230))
ARTIFACTS = ("coco", "detector.onnx")


# --------------------------------------------------------------------------- synthetic images


def render(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image ``[size, size, 3]`` uint8 with its boxes ``[M, 4]`` (xyxy) and class indices ``[M]``."""
    grey = rng.integers(60, 110, size=(size, size, 1)).astype(np.uint8)
    image = np.repeat(grey, 3, axis=2)  # grey noise: the same in every channel (small PNGs)
    yy, xx = np.mgrid[0:size, 0:size]
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            label = int(rng.integers(0, NUM_CLASSES))
            if label == 0:
                w, h = rng.integers(10, 20, size=2)
            elif label == 2:
                w, h = (rng.integers(20, 30), rng.integers(5, 8))
                if rng.random() < 0.5:
                    w, h = h, w
            else:
                w = h = 2 * int(rng.integers(5, 10))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if label == 1:
                r = w / 2
                mask = (xx + 0.5 - (x0 + r)) ** 2 + (yy + 0.5 - (y0 + r)) ** 2 <= r * r
            else:
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            if all(_apart(box, other) for other in boxes):
                image[mask] = _COLOURS[label]
                boxes.append(box)
                labels.append(label)
                break
    return image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def _apart(a: list[float], b: list[float], margin: float = 2.0) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def to_inputs(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``HWC`` images -> float32 ``[B, 3, H, W]`` in ``[0, 1]`` (what the letterbox gives at 64 x 64)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def write_coco(root: Path, images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray]) -> Path:
    """Write ``root/images/*.png`` and ``root/annotations.json`` (COCO, ``bbox`` as xywh)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i, (image, bxs, lbs) in enumerate(zip(images, boxes, labels, strict=True)):
        image_id, name = i + 1, f"{i + 1:04d}.png"
        Image.fromarray(image).save(folder / name, optimize=True)
        entries.append({"id": image_id, "file_name": name, "width": image.shape[1], "height": image.shape[0]})
        for box, label in zip(bxs.tolist(), lbs.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[label],
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    document = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------- the detector


def anchor_points(grid: int = GRID, stride: int = STRIDE) -> torch.Tensor:
    """Cell centres ``[2, N]`` in input pixels, row-major (n = gy * grid + gx)."""
    gy, gx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)]).float().add(0.5).mul(stride)


class TinyDense(torch.nn.Module):
    """Anchor-free dense detector: per stride-8 cell, C class logits and ``ltrb`` box distances."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.backbone = torch.nn.Sequential(
            conv(3, 8, 3, 2, 1), torch.nn.ReLU(),
            conv(8, FEATURES, 3, 2, 1), torch.nn.ReLU(),
            conv(FEATURES, FEATURES, 3, 2, 1), torch.nn.ReLU(),
            conv(FEATURES, FEATURES, 3, 1, 1), torch.nn.ReLU(),
        )  # fmt: skip
        self.cls = torch.nn.Conv2d(FEATURES, NUM_CLASSES, 1)
        self.box = torch.nn.Conv2d(FEATURES, 4, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, C, N]`` and ``ltrb [B, 4, N]`` (pixels)."""
        feat = self.backbone(images)
        b = images.shape[0]
        logits = self.cls(feat).reshape(b, NUM_CLASSES, -1)
        ltrb = torch.nn.functional.softplus(self.box(feat).reshape(b, 4, -1)) * STRIDE
        return logits, ltrb


def cell_targets(boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell the class index (-1: background) ``[B, N]`` and the ltrb distances ``[B, N, 4]``.

    A cell is positive for a box when its centre lies inside it (the smallest box wins).
    """
    centres = anchor_points().T.numpy()
    cls = np.full((len(boxes), CELLS), -1, dtype=np.int64)
    ltrb = np.zeros((len(boxes), CELLS, 4), dtype=np.float32)
    for i, (bxs, lbs) in enumerate(zip(boxes, labels, strict=True)):
        area = np.full(CELLS, np.inf)
        for box, label in zip(bxs, lbs, strict=True):
            inside = (centres[:, 0] > box[0]) & (centres[:, 0] < box[2])
            inside &= (centres[:, 1] > box[1]) & (centres[:, 1] < box[3])
            a = (box[2] - box[0]) * (box[3] - box[1])
            take = inside & (a < area)
            area[take], cls[i, take] = a, label
            ltrb[i, take] = np.stack(
                [centres[take, 0] - box[0], centres[take, 1] - box[1], box[2] - centres[take, 0],
                 box[3] - centres[take, 1]],
                axis=1,
            )  # fmt: skip
    return torch.from_numpy(cls), torch.from_numpy(ltrb)


def _ltrb_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two boxes given as distances ``ltrb`` from the same point (``[..., 4]``)."""
    inter_w = torch.minimum(a[..., 0], b[..., 0]) + torch.minimum(a[..., 2], b[..., 2])
    inter_h = torch.minimum(a[..., 1], b[..., 1]) + torch.minimum(a[..., 3], b[..., 3])
    inter = inter_w.clamp(min=0) * inter_h.clamp(min=0)
    area_a = (a[..., 0] + a[..., 2]) * (a[..., 1] + a[..., 3])
    area_b = (b[..., 0] + b[..., 2]) * (b[..., 1] + b[..., 3])
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


class Adam:
    """Adam by hand: ``torch.optim`` imports torch._dynamo on its first step (seconds)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, loss: torch.Tensor, lr: float) -> None:
        grads = torch.autograd.grad(loss, self.params)
        self.t += 1
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                step = lr / (1 - 0.9**self.t)
                p.addcdiv_(m, v.div(1 - 0.999**self.t).sqrt_().add_(1e-8), value=-step)


def train(images: torch.Tensor, cls_t: torch.Tensor, ltrb_t: torch.Tensor, *, steps: int, seed: int) -> TinyDense:
    """BCE of the class logits against IoU-aware targets, IoU + L1 losses on the boxes; cosine-decayed Adam."""
    torch.manual_seed(seed)
    model = TinyDense()
    torch.nn.init.constant_(model.cls.bias, -3.0)  # a rare-positive prior
    pos = cls_t >= 0
    onehot = torch.zeros(*cls_t.shape, NUM_CLASSES)
    onehot[pos] = torch.nn.functional.one_hot(cls_t[pos], NUM_CLASSES).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    optimiser = Adam(list(model.parameters()), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randperm(len(images), generator=generator)[:BATCH]
        logits, ltrb = model(images[rows])
        p, dist, target = pos[rows], ltrb.transpose(1, 2), ltrb_t[rows]
        # The class target of a positive cell is the IoU of its box with the object (as ultralytics'
        # task-aligned and VarifocalNet's targets): a score then says how well the cell localises.
        iou = _ltrb_iou(dist.detach(), target)
        soft = onehot[rows] * iou.clamp(min=0.05)[..., None]
        loss = bce(logits.transpose(1, 2), soft, reduction="sum") / p.sum().clamp(min=1)
        loss = loss + (1 - _ltrb_iou(dist, target))[p].mean() + (dist[p] - target[p]).abs().mean() / STRIDE
        lr = 1e-2 * 0.5 * (1 + np.cos(np.pi * step / steps))
        optimiser.step(loss, max(lr, 2e-4))
    with torch.no_grad():
        model.cls.weight.mul_(SHARPEN)
        model.cls.bias.mul_(SHARPEN)
    return model.eval()


# --------------------------------------------------------------------------- the ONNX graph


class Graph:
    """A small ONNX graph builder over the trained weights."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        self._n += 1
        outs = [f"/{kind.lower()}_{self._n}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(kind, inputs, outs, name=f"/{kind}_{self._n}", **attrs))
        return outs

    def conv(self, x: str, layer: torch.nn.Conv2d, name: str) -> str:
        w = self.const(f"{name}.weight", layer.weight.detach().numpy())
        b = self.const(f"{name}.bias", layer.bias.detach().numpy())
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)[0]


def ultralytics_onnx(model: TinyDense) -> onnx.ModelProto:
    """``[1, 4 + C, N]``: Concat(decoded xywh, Sigmoid(cls)) after a Split, as ultralytics' Detect exports."""
    g = Graph()
    x = "images"
    for i, layer in enumerate(model.backbone):
        x = g.conv(x, layer, f"model.backbone.{i}") if isinstance(layer, torch.nn.Conv2d) else g.op("Relu", [x])[0]
    head = g.op("Concat", [g.conv(x, model.box, "model.head.box"), g.conv(x, model.cls, "model.head.cls")], axis=1)[0]
    shape = g.const("head_shape", np.array([0, 4 + NUM_CLASSES, -1], dtype=np.int64))
    flat = g.op("Reshape", [head, shape])[0]
    split = g.const("split_box_cls", np.array([4, NUM_CLASSES], dtype=np.int64))
    reg, logits = g.op("Split", [flat, split], n_out=2, axis=1)
    dist = g.op("Mul", [g.op("Softplus", [reg])[0], g.const("stride", np.array(STRIDE, dtype=np.float32))])[0]
    lt, rb = g.op("Split", [dist, g.const("split_2_2", np.array([2, 2], dtype=np.int64))], n_out=2, axis=1)
    anchors = g.const("anchors", anchor_points().numpy()[None])
    x1y1, x2y2 = g.op("Sub", [anchors, lt])[0], g.op("Add", [anchors, rb])[0]
    cxy = g.op("Mul", [g.op("Add", [x1y1, x2y2])[0], g.const("half", np.array(0.5, dtype=np.float32))])[0]
    dbox = g.op("Concat", [cxy, g.op("Sub", [x2y2, x1y1])[0]], axis=1)[0]
    out = g.op("Concat", [dbox, g.op("Sigmoid", [logits])[0]], axis=1)[0]
    for node in g.nodes:
        node.output[:] = ["output0" if o == out else o for o in node.output]
    graph = helper.make_graph(
        g.nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + NUM_CLASSES, CELLS])],
        g.inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    meta = {
        "description": "calibrate-teacher example detector (ultralytics YOLOv8 output layout)",
        "author": "calibrate-teacher examples/make_detection_teacher.py",
        "stride": str(STRIDE),
        "task": "detect",
        "batch": "1",
        "imgsz": str([SIZE, SIZE]),
        "names": str(dict(enumerate(CLASS_NAMES))),
    }
    for key, value in meta.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(onnx_model)
    return onnx_model


def main(argv: list[str] | None = None) -> None:
    """Render, train, export; refuse to replace existing outputs without ``--overwrite``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "detection", help="Where to write (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=STEPS, help="Training steps (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
    args = parser.parse_args(argv)
    existing = [args.out / name for name in ARTIFACTS if (args.out / name).exists()]
    if existing and not args.overwrite:
        parser.error(f"{existing[0]} exists; pass --overwrite to rebuild")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    rng = np.random.default_rng(args.seed)
    train_set = [render(rng) for _ in range(TRAIN_IMAGES)]
    val_set = [render(rng) for _ in range(VAL_IMAGES)]
    cls_t, ltrb_t = cell_targets([s[1] for s in train_set], [s[2] for s in train_set])
    model = train(to_inputs([s[0] for s in train_set]), cls_t, ltrb_t, steps=args.steps, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_coco(args.out / "coco", [s[0] for s in val_set], [s[1] for s in val_set], [s[2] for s in val_set])
    onnx.save(ultralytics_onnx(model), str(args.out / "detector.onnx"))
    print(f"wrote {args.out / 'coco'} ({VAL_IMAGES} images) and {args.out / 'detector.onnx'} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
