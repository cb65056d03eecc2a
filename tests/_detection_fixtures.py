"""A tiny, really trained detector and a COCO folder for the detection tests (shared by all of them).

What it builds, once per test session (a few seconds on one CPU core), under one folder:

- ``images/*.png`` + ``annotations.json``: 64x64 synthetic images, each with 1-3 non-overlapping
  filled shapes of three classes (red ``square`` rectangles, green ``disc`` circles, blue ``bar``
  elongated rectangles) on grey noise; boxes are the tight pixel bounds of each painted shape. COCO
  category ids are non-contiguous (1, 3, 7) and image ids start at 101 in steps of 2.
- :class:`TinyDense`: an anchor-free dense detector in plain torch (stride-8 grid of 8x8 cells, per
  cell class logits, ``ltrb`` box distances and a centerness/objectness logit), with torchvision's
  RetinaNet/FCOS attribute names (``head.classification_head.cls_logits``,
  ``head.regression_head.bbox_reg``, ``head.regression_head.bbox_ctrness``). It is trained for a few
  hundred Adam steps on separate training images, then its class layer is scaled by
  :data:`SHARPEN` so the teacher is clearly over-confident (a fitted T near ``SHARPEN`` undoes it).
- ONNX exports of it, built node by node from the trained weights (no exporter: fast, and the
  graphs are exactly the shapes real exporters write):

  * ``dense.onnx``: ultralytics YOLOv8/v11 layout: input ``images`` ``[1, 3, 64, 64]`` (static batch
    1, as ultralytics exports by default), output ``output0`` ``[B, 4 + C, N]`` = ``Concat(dbox,
    Sigmoid(cls))`` after a ``Split`` of the concatenated head, as ``Detect._inference`` does;
    ``metadata_props`` ``names`` (``"{0: 'square', ...}"``), ``imgsz`` (``"[64, 64]"``), ``stride``,
    ``task``;
  * ``dense_yolox.onnx``: YOLOX layout ``[B, N, 5 + C]`` (cx, cy, w, h, sigmoid objectness, sigmoid
    classes), dynamic batch;
  * ``dense_generic.onnx``: named outputs ``boxes`` ``[B, N, 4]`` (xyxy) and ``scores``
    ``[B, N, C]`` (``Transpose(Sigmoid(.))``); ``dense_generic_raw.onnx``: the same with no Sigmoid
    (logits or scores cannot be told apart: must be refused).
- ``dense.safetensors``: the TinyDense state dict (factory ``f"{FIXTURES_FILE}:tiny_dense"``).
- :class:`TinyTwoStage`: a two-stage-like detector with torchvision Faster R-CNN names
  (``rpn.head.cls_logits``, ``roi_heads.box_head.fc6``, ``roi_heads.box_predictor.cls_score``
  softmax over C + 1 with background first, ``roi_heads.box_predictor.bbox_pred``), or with
  detectron2's (``proposal_generator.rpn_head.objectness_logits``, ``roi_heads.box_head.fc1``,
  ``roi_heads.box_predictor.cls_score`` with background last) via ``layout="detectron2"``; its
  box head is trained on the dense backbone's features. ``two_stage.safetensors`` (torchvision) and
  ``two_stage_d2.safetensors`` (detectron2); factory ``f"{FIXTURES_FILE}:tiny_two_stage"``.

Both torch detectors follow the forward contract of ``calibrate_teacher.detection._torch``:
``model(images [B, 3, H, W]) -> [{"boxes": [N, 4] xyxy input pixels, "logits": [N, K]}, ...]``.

Use it from a test file through :func:`shared` (built once per process, whichever files use it)::

    import _detection_fixtures as dfx

    @pytest.fixture(scope="module")
    def fx(tmp_path_factory):
        return dfx.shared(tmp_path_factory.getbasetemp())

(or ``from _detection_fixtures import detection_fixture``, a session-scoped fixture), or call
:func:`build` yourself. This file is also an ``--arch`` target, so it imports nothing from the
tests package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

FIXTURES_FILE = Path(__file__).resolve()
SIZE, STRIDE = 64, 8
GRID = SIZE // STRIDE
CELLS = GRID * GRID
CLASS_NAMES = ("square", "disc", "bar")
CATEGORY_IDS = (1, 3, 7)
NUM_CLASSES = len(CLASS_NAMES)
FEATURES = 16
#: The trained class layer is multiplied by this, so the teacher is over-confident by about it.
SHARPEN = 2.0
TRAIN_IMAGES, VAL_IMAGES = 32, 16
TRAIN_STEPS, HEAD_STEPS = 160, 120
OPSET, IR_VERSION = 17, 9
PROPOSALS = 16  # proposals per image of the two-stage detector
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230))


# --------------------------------------------------------------------------- synthetic images


def render(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image ``[size, size, 3]`` uint8 with its boxes ``[M, 4]`` (xyxy) and class indices ``[M]``."""
    image = rng.integers(60, 110, size=(size, size, 3)).astype(np.uint8)
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
    """uint8 ``HWC`` images -> float32 ``[B, 3, H, W]`` in ``[0, 1]`` (the models' input)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def write_coco(root: Path, images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray]) -> Path:
    """Write ``root/images/*.png`` and ``root/annotations.json`` (COCO, ``bbox`` as xywh)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i, (image, bxs, lbs) in enumerate(zip(images, boxes, labels, strict=True)):
        image_id, name = 101 + 2 * i, f"img_{i:03d}.png"
        Image.fromarray(image).save(folder / name)
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
    path.write_text(json.dumps(document, indent=1))
    return path


# --------------------------------------------------------------------------- models


def anchor_points(grid: int = GRID, stride: int = STRIDE) -> torch.Tensor:
    """Cell centres ``[2, N]`` in input pixels, row-major (n = gy * grid + gx)."""
    gy, gx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)]).float().add(0.5).mul(stride)


def _backbone() -> torch.nn.Sequential:
    conv = torch.nn.Conv2d
    return torch.nn.Sequential(
        conv(3, 8, 3, 2, 1), torch.nn.ReLU(),
        conv(8, FEATURES, 3, 2, 1), torch.nn.ReLU(),
        conv(FEATURES, FEATURES, 3, 2, 1), torch.nn.ReLU(),
        conv(FEATURES, FEATURES, 3, 1, 1), torch.nn.ReLU(),
    )  # fmt: skip


class _Namespace(torch.nn.Module):
    """An empty module that only holds named children (``head.classification_head``...)."""


class TinyDense(torch.nn.Module):
    """Anchor-free dense detector with RetinaNet/FCOS attribute names; see the module docstring."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = _backbone()
        self.head = _Namespace()
        self.head.classification_head = _Namespace()
        self.head.classification_head.cls_logits = torch.nn.Conv2d(FEATURES, num_classes, 1)
        self.head.regression_head = _Namespace()
        self.head.regression_head.bbox_reg = torch.nn.Conv2d(FEATURES, 4, 1)
        self.head.regression_head.bbox_ctrness = torch.nn.Conv2d(FEATURES, 1, 1)

    def raw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits [B, C, N]``, ``objectness [B, N]``, ``ltrb [B, 4, N]`` (pixels), ``xyxy [B, N, 4]``."""
        feat = self.backbone(images)
        b = images.shape[0]
        cls = self.head.classification_head.cls_logits(feat).reshape(b, self.num_classes, -1)
        reg = self.head.regression_head.bbox_reg(feat).reshape(b, 4, -1)
        obj = self.head.regression_head.bbox_ctrness(feat).reshape(b, -1)
        ltrb = torch.nn.functional.softplus(reg) * STRIDE
        anchors = anchor_points(images.shape[2] // STRIDE)[None]
        xyxy = torch.cat([anchors - ltrb[:, :2], anchors + ltrb[:, 2:]], dim=1)
        return {"logits": cls, "objectness": obj, "ltrb": ltrb, "xyxy": xyxy.transpose(1, 2)}

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The candidates contract: per image ``boxes [N, 4]`` and ``logits [N, C]`` (every cell)."""
        out = self.raw(images)
        return [{"boxes": out["xyxy"][i], "logits": out["logits"][i].T} for i in range(images.shape[0])]


def tiny_dense() -> TinyDense:
    """``--arch`` factory of :class:`TinyDense`."""
    return TinyDense()


class TinyTwoStage(torch.nn.Module):
    """Proposals from an RPN-like head, then a box head with Faster R-CNN's attribute names.

    Proposals are the ``PROPOSALS`` cells with the highest RPN objectness, with the RPN's
    decoded box; a RoI's feature is its cell's backbone feature. ``logits`` are the rows of
    ``roi_heads.box_predictor.cls_score`` (C + 1 columns, background ``first`` for the
    torchvision layout, ``last`` for detectron2's); ``boxes`` are the proposals moved by
    ``bbox_pred``'s deltas (pixels) of each RoI's best foreground class.
    """

    def __init__(self, layout: str = "torchvision", num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if layout not in ("torchvision", "detectron2"):
            raise ValueError(f"layout {layout!r}: expected torchvision or detectron2")
        self.layout, self.num_classes = layout, num_classes
        self.backbone = _backbone()
        rpn = _Namespace()
        if layout == "torchvision":
            self.rpn = _Namespace()
            self.rpn.head = rpn
            rpn.cls_logits = torch.nn.Conv2d(FEATURES, 1, 1)
            rpn.bbox_pred = torch.nn.Conv2d(FEATURES, 4, 1)
        else:
            self.proposal_generator = _Namespace()
            self.proposal_generator.rpn_head = rpn
            rpn.objectness_logits = torch.nn.Conv2d(FEATURES, 1, 1)
            rpn.anchor_deltas = torch.nn.Conv2d(FEATURES, 4, 1)
        self.roi_heads = _Namespace()
        self.roi_heads.box_head = _Namespace()
        first, second = ("fc6", "fc7") if layout == "torchvision" else ("fc1", "fc2")
        setattr(self.roi_heads.box_head, first, torch.nn.Linear(FEATURES, 32))
        setattr(self.roi_heads.box_head, second, torch.nn.Linear(32, 32))
        self.roi_heads.box_predictor = _Namespace()
        self.roi_heads.box_predictor.cls_score = torch.nn.Linear(32, num_classes + 1)
        self.roi_heads.box_predictor.bbox_pred = torch.nn.Linear(32, 4 * (num_classes + 1))

    def _rpn(self) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d]:
        if self.layout == "torchvision":
            return self.rpn.head.cls_logits, self.rpn.head.bbox_pred
        head = self.proposal_generator.rpn_head
        return head.objectness_logits, head.anchor_deltas

    def box_head(self, roi: torch.Tensor) -> torch.Tensor:
        """RoI features ``[R, F]`` -> box-head features ``[R, 32]``."""
        fcs = list(self.roi_heads.box_head.children())
        return torch.relu(fcs[1](torch.relu(fcs[0](roi))))

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The candidates contract: per image ``boxes [P, 4]`` and ``logits [P, C + 1]``."""
        feat = self.backbone(images)
        b, f = feat.shape[:2]
        objectness, deltas = self._rpn()
        obj = objectness(feat).reshape(b, -1)
        ltrb = torch.nn.functional.softplus(deltas(feat).reshape(b, 4, -1)) * STRIDE
        anchors = anchor_points(images.shape[2] // STRIDE)[None]
        proposals = torch.cat([anchors - ltrb[:, :2], anchors + ltrb[:, 2:]], dim=1).transpose(1, 2)
        cells = feat.reshape(b, f, -1).transpose(1, 2)
        out = []
        for i in range(b):
            keep = obj[i].topk(min(PROPOSALS, obj.shape[1])).indices
            hidden = self.box_head(cells[i, keep])
            logits = self.roi_heads.box_predictor.cls_score(hidden)
            moves = self.roi_heads.box_predictor.bbox_pred(hidden).reshape(len(keep), -1, 4)
            fg = logits[:, 1:] if self.layout == "torchvision" else logits[:, :-1]
            best = fg.argmax(dim=1) + (1 if self.layout == "torchvision" else 0)
            boxes = proposals[i, keep] + moves[torch.arange(len(keep)), best]
            out.append({"boxes": boxes, "logits": logits})
        return out

    def classify_proposals(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI head's class logits ``[N_i, C + 1]`` of given boxes (xyxy input pixels).

        A box's RoI feature is the backbone feature of the grid cell holding its centre (clamped
        to the grid), as ``forward``'s proposals take their own cell's feature, and as the box
        head was trained (a cell is labelled by the box holding its centre).
        """
        feat = self.backbone(images)
        b, f, gh, gw = feat.shape
        cells = feat.reshape(b, f, -1).transpose(1, 2)
        out = []
        for i, boxes in enumerate(proposals):
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            gx = torch.div(centre[:, 0], STRIDE, rounding_mode="floor").long().clamp(0, gw - 1)
            gy = torch.div(centre[:, 1], STRIDE, rounding_mode="floor").long().clamp(0, gh - 1)
            out.append(self.roi_heads.box_predictor.cls_score(self.box_head(cells[i, gy * gw + gx])))
        return out


def tiny_two_stage(layout: str = "torchvision") -> TinyTwoStage:
    """``--arch`` factory of :class:`TinyTwoStage` (``layout``: torchvision or detectron2)."""
    return TinyTwoStage(layout)


class _Adam:
    """Adam by hand: ``torch.optim`` imports torch._dynamo on its first step (seconds)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.params)
        self.t += 1
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                step = self.lr / (1 - 0.9**self.t)
                p.addcdiv_(m, v.div(1 - 0.999**self.t).sqrt_().add_(1e-8), value=-step)


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
                [
                    centres[take, 0] - box[0],
                    centres[take, 1] - box[1],
                    box[2] - centres[take, 0],
                    box[3] - centres[take, 1],
                ],
                axis=1,
            )
    return torch.from_numpy(cls), torch.from_numpy(ltrb)


def train(images: torch.Tensor, boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[TinyDense, TinyTwoStage]:
    """Train both detectors (seeded; a few seconds), then sharpen the class layers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only contend on a shared machine
    try:
        return _train(images, boxes, labels)
    finally:
        torch.set_num_threads(threads)


def _train(images: torch.Tensor, boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[TinyDense, TinyTwoStage]:
    torch.manual_seed(0)
    dense = TinyDense()
    torch.nn.init.constant_(dense.head.classification_head.cls_logits.bias, -3.0)  # a rare-positive prior
    cls_t, ltrb_t = cell_targets(boxes, labels)
    pos = cls_t >= 0
    onehot = torch.zeros(*cls_t.shape, NUM_CLASSES)
    onehot[pos] = torch.nn.functional.one_hot(cls_t[pos], NUM_CLASSES).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    optimiser = _Adam(list(dense.parameters()), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        out = dense.raw(images)
        loss = bce(out["logits"].transpose(1, 2), onehot, reduction="sum") / pos.sum().clamp(min=1)
        loss = loss + bce(out["objectness"], pos.float())
        loss = loss + (out["ltrb"].transpose(1, 2)[pos] - ltrb_t[pos]).abs().mean() / STRIDE
        optimiser.step(loss)
    with torch.no_grad():
        dense.head.classification_head.cls_logits.weight.mul_(SHARPEN)
        dense.head.classification_head.cls_logits.bias.mul_(SHARPEN)
    dense.eval()

    two = TinyTwoStage()
    two.backbone.load_state_dict(dense.backbone.state_dict())
    two.rpn.head.cls_logits.load_state_dict(dense.head.regression_head.bbox_ctrness.state_dict())
    two.rpn.head.bbox_pred.load_state_dict(dense.head.regression_head.bbox_reg.state_dict())
    with torch.no_grad():
        cells = dense.backbone(images).flatten(2).transpose(1, 2).reshape(-1, FEATURES)
    target = (cls_t + 1).reshape(-1)  # background first
    params = [*two.roi_heads.box_head.parameters(), *two.roi_heads.box_predictor.cls_score.parameters()]
    optimiser = _Adam(params, lr=1e-2)
    for _ in range(HEAD_STEPS):
        logits = two.roi_heads.box_predictor.cls_score(two.box_head(cells))
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimiser.step(loss)
    with torch.no_grad():
        two.roi_heads.box_predictor.cls_score.weight.mul_(SHARPEN)
        two.roi_heads.box_predictor.cls_score.bias.mul_(SHARPEN)
        two.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
    two.eval()
    return dense, two


def to_detectron2(two: TinyTwoStage) -> TinyTwoStage:
    """The same detector in detectron2's layout (names, and the background column moved last)."""
    d2 = TinyTwoStage("detectron2")
    d2.backbone.load_state_dict(two.backbone.state_dict())
    d2.proposal_generator.rpn_head.objectness_logits.load_state_dict(two.rpn.head.cls_logits.state_dict())
    d2.proposal_generator.rpn_head.anchor_deltas.load_state_dict(two.rpn.head.bbox_pred.state_dict())
    d2.roi_heads.box_head.fc1.load_state_dict(two.roi_heads.box_head.fc6.state_dict())
    d2.roi_heads.box_head.fc2.load_state_dict(two.roi_heads.box_head.fc7.state_dict())
    order = [*range(1, NUM_CLASSES + 1), 0]
    src, dst = two.roi_heads.box_predictor, d2.roi_heads.box_predictor
    with torch.no_grad():
        dst.cls_score.weight.copy_(src.cls_score.weight[order])
        dst.cls_score.bias.copy_(src.cls_score.bias[order])
        dst.bbox_pred.weight.copy_(src.bbox_pred.weight.reshape(-1, 4, 32)[order].reshape(-1, 32))
        dst.bbox_pred.bias.copy_(src.bbox_pred.bias.reshape(-1, 4)[order].reshape(-1))
    return d2.eval()


# --------------------------------------------------------------------------- ONNX graphs


class _Graph:
    """A small ONNX graph builder over one TinyDense's weights."""

    def __init__(self, dense: TinyDense) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dense = dense
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

    def features(self, x: str) -> str:
        for i, layer in enumerate(self.dense.backbone):
            conv = isinstance(layer, torch.nn.Conv2d)
            x = self.conv(x, layer, f"backbone.{i}") if conv else self.op("Relu", [x])[0]
        return x

    def flat(self, x: str, channels: int) -> str:
        shape = self.const(f"shape_{self._n}", np.array([0, channels, -1], dtype=np.int64))
        return self.op("Reshape", [x, shape])[0]

    def ltrb_to_boxes(self, reg: str, *, centre: bool) -> str:
        """Softplus(reg) * stride, decoded around the anchors: ``[B, 4, N]`` cxcywh or xyxy."""
        stride = self.const("stride", np.array(STRIDE, dtype=np.float32))
        dist = self.op("Mul", [self.op("Softplus", [reg])[0], stride])[0]
        split = self.const("split_2_2", np.array([2, 2], dtype=np.int64))
        lt, rb = self.op("Split", [dist, split], n_out=2, axis=1)
        anchors = self.const("anchors", anchor_points().numpy()[None])
        x1y1, x2y2 = self.op("Sub", [anchors, lt])[0], self.op("Add", [anchors, rb])[0]
        if not centre:
            return self.op("Concat", [x1y1, x2y2], axis=1)[0]
        half = self.const("half", np.array(0.5, dtype=np.float32))
        cxy = self.op("Mul", [self.op("Add", [x1y1, x2y2])[0], half])[0]
        wh = self.op("Sub", [x2y2, x1y1])[0]
        return self.op("Concat", [cxy, wh], axis=1)[0]

    def model(
        self, outputs: list[tuple[str, str, list[object]]], batch: int | str, meta: dict[str, str]
    ) -> onnx.ModelProto:
        for tensor, name, _ in outputs:  # the node writing each output gets the output's name
            for node in self.nodes:
                for j, out in enumerate(node.output):
                    if out == tensor:
                        node.output[j] = name
                for j, inp in enumerate(node.input):
                    if inp == tensor:
                        node.input[j] = name
        graph = helper.make_graph(
            self.nodes,
            "tiny_dense",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for _, name, shape in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        return model


ULTRALYTICS_META = {
    "description": "Ultralytics YOLOv8n model (tiny fixture)",
    "author": "Ultralytics",
    "version": "8.3.0",
    "license": "AGPL-3.0 License (https://ultralytics.com/license)",
    "stride": str(STRIDE),
    "task": "detect",
    "batch": "1",
    "imgsz": str([SIZE, SIZE]),
    "names": str(dict(enumerate(CLASS_NAMES))),
}


def ultralytics_onnx(dense: TinyDense) -> onnx.ModelProto:
    """``[1, 4 + C, N]``: Concat(decoded xywh, Sigmoid(cls)) after a Split, as ultralytics exports."""
    g = _Graph(dense)
    feat = g.features("images")
    box = g.conv(feat, dense.head.regression_head.bbox_reg, "head.box")
    cls = g.conv(feat, dense.head.classification_head.cls_logits, "head.cls")
    head = g.flat(g.op("Concat", [box, cls], axis=1)[0], 4 + NUM_CLASSES)
    split = g.const("split_box_cls", np.array([4, NUM_CLASSES], dtype=np.int64))
    reg, logits = g.op("Split", [head, split], n_out=2, axis=1)
    dbox = g.ltrb_to_boxes(reg, centre=True)
    out = g.op("Concat", [dbox, g.op("Sigmoid", [logits])[0]], axis=1)[0]
    return g.model([(out, "output0", [1, 4 + NUM_CLASSES, CELLS])], 1, ULTRALYTICS_META)


def yolox_onnx(dense: TinyDense) -> onnx.ModelProto:
    """``[B, N, 5 + C]``: Transpose(Concat(cxcywh, Sigmoid(obj), Sigmoid(cls)))."""
    g = _Graph(dense)
    feat = g.features("images")
    reg = g.flat(g.conv(feat, dense.head.regression_head.bbox_reg, "head.box"), 4)
    obj = g.flat(g.conv(feat, dense.head.regression_head.bbox_ctrness, "head.obj"), 1)
    cls = g.flat(g.conv(feat, dense.head.classification_head.cls_logits, "head.cls"), NUM_CLASSES)
    dbox = g.ltrb_to_boxes(reg, centre=True)
    cat = g.op("Concat", [dbox, g.op("Sigmoid", [obj])[0], g.op("Sigmoid", [cls])[0]], axis=1)[0]
    out = g.op("Transpose", [cat], perm=[0, 2, 1])[0]
    return g.model([(out, "output", ["batch", CELLS, 5 + NUM_CLASSES])], "batch", {})


def generic_onnx(dense: TinyDense, *, sigmoid: bool = True) -> onnx.ModelProto:
    """Named outputs ``boxes [B, N, 4]`` (xyxy) and ``scores [B, N, C]`` (sigmoid, or raw)."""
    g = _Graph(dense)
    feat = g.features("images")
    reg = g.flat(g.conv(feat, dense.head.regression_head.bbox_reg, "head.box"), 4)
    cls = g.flat(g.conv(feat, dense.head.classification_head.cls_logits, "head.cls"), NUM_CLASSES)
    boxes = g.op("Transpose", [g.ltrb_to_boxes(reg, centre=False)], perm=[0, 2, 1])[0]
    scores = g.op("Transpose", [g.op("Sigmoid", [cls])[0] if sigmoid else cls], perm=[0, 2, 1])[0]
    return g.model(
        [(boxes, "boxes", ["batch", CELLS, 4]), (scores, "scores", ["batch", CELLS, NUM_CLASSES])],
        "batch",
        {},
    )


# --------------------------------------------------------------------------- the fixture


@dataclass(frozen=True)
class DetectionFixture:
    """Everything :func:`build` wrote and trained (paths, models, the validation images)."""

    root: Path
    images_dir: Path
    annotations: Path
    onnx: Path
    yolox_onnx: Path
    generic_onnx: Path
    generic_raw_onnx: Path
    dense_weights: Path
    two_stage_weights: Path
    two_stage_d2_weights: Path
    dense: TinyDense
    two_stage: TinyTwoStage
    two_stage_d2: TinyTwoStage
    images: torch.Tensor  # the validation images [B, 3, 64, 64], in annotations.json order
    image_ids: tuple[int, ...]
    boxes: tuple[np.ndarray, ...]  # ground truth xyxy per image
    labels: tuple[np.ndarray, ...]  # model class indices per image
    dense_arch: str = f"{FIXTURES_FILE}:tiny_dense"
    two_stage_arch: str = f"{FIXTURES_FILE}:tiny_two_stage"

    def batches(self, batch_size: int = 4) -> list[object]:
        """The validation images as ``DetectionBatch`` objects (identity transforms)."""
        from calibrate_teacher.detection.base import DetectionBatch, GroundTruth, ImageTransform

        out: list[object] = []
        for start in range(0, len(self.image_ids), batch_size):
            rows = range(start, min(start + batch_size, len(self.image_ids)))
            out.append(
                DetectionBatch(
                    images=self.images[start : rows.stop],
                    image_ids=tuple(self.image_ids[i] for i in rows),
                    transforms=tuple(ImageTransform(1.0, 1.0, 0.0, 0.0, SIZE, SIZE) for _ in rows),
                    targets=tuple(
                        GroundTruth(
                            boxes=torch.from_numpy(self.boxes[i]),
                            labels=torch.from_numpy(self.labels[i]),
                            crowd=torch.zeros(len(self.labels[i]), dtype=torch.bool),
                        )
                        for i in rows
                    ),
                )
            )
        return out


def build(root: Path) -> DetectionFixture:
    """Render, train, export and save everything under ``root`` (deterministic)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_set = [render(rng) for _ in range(TRAIN_IMAGES)]
    val_set = [render(rng) for _ in range(VAL_IMAGES)]
    dense, two = train(to_inputs([s[0] for s in train_set]), [s[1] for s in train_set], [s[2] for s in train_set])
    d2 = to_detectron2(two)
    annotations = write_coco(root, [s[0] for s in val_set], [s[1] for s in val_set], [s[2] for s in val_set])
    paths = {
        "onnx": (root / "dense.onnx", ultralytics_onnx(dense)),
        "yolox_onnx": (root / "dense_yolox.onnx", yolox_onnx(dense)),
        "generic_onnx": (root / "dense_generic.onnx", generic_onnx(dense)),
        "generic_raw_onnx": (root / "dense_generic_raw.onnx", generic_onnx(dense, sigmoid=False)),
    }
    for path, model in paths.values():
        onnx.save(model, str(path))
    weights = {
        "dense_weights": (root / "dense.safetensors", dense),
        "two_stage_weights": (root / "two_stage.safetensors", two),
        "two_stage_d2_weights": (root / "two_stage_d2.safetensors", d2),
    }
    for path, module in weights.values():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return DetectionFixture(
        root=root,
        images_dir=root / "images",
        annotations=annotations,
        **{k: p for k, (p, _) in paths.items()},
        **{k: p for k, (p, _) in weights.items()},
        dense=dense,
        two_stage=two,
        two_stage_d2=d2,
        images=to_inputs([s[0] for s in val_set]),
        image_ids=tuple(101 + 2 * i for i in range(VAL_IMAGES)),
        boxes=tuple(s[1] for s in val_set),
        labels=tuple(s[2] for s in val_set),
    )


_BUILT: dict[Path, DetectionFixture] = {}


def shared(base: Path) -> DetectionFixture:
    """:func:`build` under ``base / "detection-fixture"``, once per process."""
    root = base / "detection-fixture"
    if root not in _BUILT:
        _BUILT[root] = build(root)
    return _BUILT[root]


@pytest.fixture(scope="session")
def detection_fixture(tmp_path_factory: pytest.TempPathFactory) -> DetectionFixture:
    """The shared detection fixture (built once per test session)."""
    return shared(tmp_path_factory.getbasetemp())
