"""PyTorch detection teachers: a state dict (safetensors or ``.pt``) + an ``--arch`` factory.

**Forward contract.** The factory returns the detector as an ``nn.Module`` whose state dict has
the file's keys (loaded with ``strict=True``), and whose ``forward`` in eval mode returns the
pre-NMS candidates with their class logits::

    model(images)  # images: float [B, 3, H, W], as the data source preprocesses them
    -> [{"boxes": [N, 4] xyxy in input pixels, "logits": [N, K], "objectness": [N] (optional)}, ...]

one mapping per image. ``logits`` are the outputs of the class-logit layer for those boxes
(before softmax / sigmoid); which boxes are kept must not depend on the class scores in a way a
temperature would change (a two-stage detector's proposals come from its RPN; a dense detector
returns every anchor, or a top-k by *sigmoid* score, which T does not reorder).

**Class-logit layer** (the only layer a bake changes), found by its name: the first module
named, or ending in, one of

* ``roi_heads.box_predictor.cls_score``: ``nn.Linear``, softmax over C + 1 columns
  (torchvision Faster R-CNN: background **first**; detectron2 ``FastRCNNOutputLayers``:
  background **last**: a model holding a ``proposal_generator`` is read as detectron2's, one
  holding an ``rpn`` as torchvision's, and ``background=`` says it otherwise);
* ``head.classification_head.cls_logits``: ``nn.Conv2d``, a sigmoid per class (torchvision
  RetinaNet / FCOS);

or ``class_layer=NAME`` (then ``head=`` is required). Box regression, centerness and
objectness layers are never touched.

**The torchvision route** (torchvision itself is never imported here): subclass the detector
and return RoI candidates instead of post-processed detections, e.g. for Faster R-CNN::

    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn

    class Candidates(FasterRCNN):
        def forward(self, images):
            sizes = [img.shape[-2:] for img in images]
            batch, _ = self.transform(list(images))
            features = self.backbone(batch.tensors)
            proposals, _ = self.rpn(batch, features)
            x = self.roi_heads.box_head(self.roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
            logits, deltas = self.roi_heads.box_predictor(x)
            boxes = self.roi_heads.box_coder.decode(deltas, proposals)  # [R, C + 1, 4]
            best = logits[:, 1:].argmax(1) + 1  # the box of each RoI's best foreground class
            boxes = boxes[torch.arange(len(best)), best].split([len(p) for p in proposals])
            out = []
            for b, z, s, (h, w) in zip(boxes, logits.split([len(p) for p in proposals]), batch.image_sizes, sizes):
                scale = torch.tensor([w / s[1], h / s[0]] * 2)  # back to the input's pixels
                out.append({"boxes": b * scale, "logits": z})
            return out

    def teacher():  # --arch teacher_file.py:teacher
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        model.__class__ = Candidates
        return model
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.detection.base import BackgroundLayout, Detections, HeadKind
from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._arch import build_model, user_code_error
from calibrate_teacher.teachers._files import detect_format
from calibrate_teacher.teachers._safetensors import _check_keys, read_state

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import InputSpec, TeacherFormat

#: Known class-logit layers (by module name suffix) and their head kind.
KNOWN_LAYERS: tuple[tuple[str, HeadKind], ...] = (
    ("roi_heads.box_predictor.cls_score", "softmax"),
    ("head.classification_head.cls_logits", "sigmoid"),
)
PROBE_SIZE = 64  # height and width of the load-time probe images


class TorchDetectionTeacher:
    """A :class:`~calibrate_teacher.detection.base.DetectionTeacher` over an ``nn.Module``."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        model: torch.nn.Module,
        *,
        arch: str,
        class_layer: str,
        head: HeadKind,
        background: BackgroundLayout,
        device: str,
        notes: list[str],
        key_prefix: str,
        nested_key: str | None,
    ) -> None:
        self.path = path
        self.format = fmt
        self.model = model
        self.arch = arch
        #: The module whose weight and bias a bake divides by T.
        self.class_layer = class_layer
        self.head: HeadKind = head
        self.background: BackgroundLayout = background
        self.num_classes = 0
        self.class_names: tuple[str, ...] | None = None
        self.input_spec: InputSpec | None = None
        self.device = device
        self.notes = notes
        self.key_prefix = key_prefix
        self.nested_key = nested_key

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Run the forward contract (module docstring); float32 CPU tensors, one entry per image."""
        import torch

        try:
            with torch.inference_mode():
                out = self.model(images.to(self.device))
        except Exception as exc:  # user code: whatever it raises is its error, not ours
            raise user_code_error(self.arch, f"running the detector on {tuple(images.shape)}", exc) from exc
        if not isinstance(out, list | tuple) or len(out) != images.shape[0]:
            raise TeacherError(
                f"{self.path}: the detector's forward must return one mapping per image (boxes, logits), "
                f"got {type(out).__name__}{f' of {len(out)}' if isinstance(out, list | tuple) else ''} "
                f"for {images.shape[0]} images; see the forward contract in docs/detection.md"
            )
        return [self._one(item) for item in out]

    def roi_logits(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI head's class logits ``[N_i, C + 1]`` of given boxes (xyxy input pixels), one per image.

        Calls the module's ``classify_proposals(images, proposals)`` (the contract in
        :mod:`calibrate_teacher.detection.proposals`); float32 CPU tensors.

        Raises:
            TeacherError: the module has no ``classify_proposals``, or it returns other shapes.
        """
        import torch

        classify = getattr(self.model, "classify_proposals", None)
        if not callable(classify):
            raise TeacherError(
                f"{self.path}: the detector module {type(self.model).__name__} has no "
                "classify_proposals(images, proposals); see docs/detection.md"
            )
        try:
            with torch.inference_mode():
                out = classify(images.to(self.device), [p.to(self.device) for p in proposals])
        except Exception as exc:  # user code
            raise user_code_error(self.arch, "classifying proposals", exc) from exc
        ok = isinstance(out, list | tuple) and len(out) == len(proposals)
        ok = ok and all(
            isinstance(z, torch.Tensor) and z.ndim == 2 and z.shape[0] == len(p)
            for z, p in zip(out, proposals, strict=False)
        )
        if not ok:
            raise TeacherError(
                f"{self.path}: classify_proposals must return one [N_i, C + 1] tensor per image's "
                f"proposals, got {type(out).__name__}; see docs/detection.md"
            )
        return [z.detach().float().cpu() for z in out]

    def _one(self, item: object) -> Detections:
        import torch

        if not isinstance(item, Mapping) or "boxes" not in item or "logits" not in item:
            keys = list(item) if isinstance(item, Mapping) else type(item).__name__
            raise TeacherError(
                f"{self.path}: each image's result must map 'boxes' and 'logits' (got {keys}); "
                "see the forward contract in docs/detection.md"
            )
        boxes, logits = item["boxes"], item["logits"]
        objectness = item.get("objectness")
        ok = isinstance(boxes, torch.Tensor) and isinstance(logits, torch.Tensor)
        ok = ok and boxes.ndim == 2 and boxes.shape[1] == 4 and logits.ndim == 2 and logits.shape[0] == boxes.shape[0]
        if objectness is not None:
            ok = ok and isinstance(objectness, torch.Tensor) and tuple(objectness.shape) == (boxes.shape[0],)
        if not ok:
            raise TeacherError(
                f"{self.path}: expected boxes [N, 4] and logits [N, K] (objectness [N]) per image, got "
                f"{_shape(boxes)}, {_shape(logits)}; see the forward contract in docs/detection.md"
            )
        return Detections(
            boxes=boxes.detach().float().cpu(),
            logits=logits.detach().float().cpu(),
            head=self.head,
            background=self.background,
            objectness=None if objectness is None else objectness.detach().float().cpu(),
        )


def _shape(x: object) -> str:
    shape = getattr(x, "shape", None)
    return str(list(shape)) if shape is not None else type(x).__name__


def find_class_layer(
    model: torch.nn.Module, name: str | None, head: HeadKind | None, *, file: Path
) -> tuple[str, HeadKind]:
    """The class-logit layer's module name and head kind (see the module docstring)."""
    import torch

    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise InvalidValueError(f"class_layer {name!r}: no such module in the model built for {file}")
        if head is None:
            raise InvalidValueError(f"class_layer {name!r}: also say head='softmax' or head='sigmoid'")
        found: tuple[str, HeadKind] = (name, head)
    else:
        hits = [
            (module, kind)
            for suffix, kind in KNOWN_LAYERS
            for module in modules
            if module == suffix or module.endswith("." + suffix)
        ]
        if len(hits) != 1:
            what = "none" if not hits else ", ".join(h for h, _ in hits)
            raise TeacherError(
                f"{file}: expected one class-logit layer named {' or '.join(s for s, _ in KNOWN_LAYERS)} "
                f"(found {what}); name it with class_layer=NAME and head="
            )
        found = hits[0]
        if head is not None and head != found[1]:
            raise InvalidValueError(f"{file}: head={head!r} but {found[0]} is a {found[1]} head")
    layer = modules[found[0]]
    if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or layer.bias is None:
        raise TeacherError(
            f"{file}: the class-logit layer {found[0]} is a {type(layer).__name__}; a Linear or Conv2d "
            "with a bias is needed (T is folded into its weight and bias)"
        )
    return found


def _background(
    model: torch.nn.Module, head: HeadKind, given: BackgroundLayout | None, file: Path, notes: list[str]
) -> BackgroundLayout:
    if head == "sigmoid":
        if given not in (None, "none"):
            raise InvalidValueError(f"{file}: background={given!r} but the class layer is a sigmoid head")
        return "none"
    if given in ("first", "last"):
        return given
    if given == "none":
        raise InvalidValueError(f"{file}: a softmax head has a background column; background='first' or 'last'")
    names = {n.split(".")[0] for n, _ in model.named_modules() if n}
    if "proposal_generator" in names:
        notes.append(f"{file.name}: background column read as last (a detectron2 layout: proposal_generator)")
        return "last"
    if "rpn" not in names:
        notes.append(
            f"{file.name}: background column assumed first (torchvision's layout); pass background='last' "
            "for detectron2's"
        )
    return "first"


def load(
    path: Path,
    *,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | str | None,
    head: HeadKind | None,
    background: BackgroundLayout | None,
    class_layer: str | None,
    device: str,
) -> TorchDetectionTeacher:
    """Build ``arch``, load ``path`` into it (strict) and check the forward contract on a probe."""
    import torch

    if arch is None:
        raise TeacherError(
            f"{path}: holds weights only; name the detector's architecture with --arch "
            "pkg.module:factory or --arch path/to/file.py:factory (forward contract: docs/detection.md)"
        )
    fmt: TeacherFormat = "safetensors" if detect_format(path, arch=arch) == "safetensors" else "state_dict"
    model = build_model(arch, arch_kwargs)
    state, nested, prefix = read_state(path, fmt)
    _check_keys(path, arch, model, state)
    model.load_state_dict(state, strict=True)
    where = resolve_device(device)
    model.eval().to(where)
    name, kind = find_class_layer(model, class_layer, head, file=path)
    notes: list[str] = []
    teacher = TorchDetectionTeacher(
        path, fmt, model, arch=arch, class_layer=name, head=kind,
        background=_background(model, kind, background, path, notes), device=where, notes=notes,
        key_prefix=prefix, nested_key=nested,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 3, PROBE_SIZE, PROBE_SIZE, generator=generator)
    width = teacher.detect(probe)[0].logits.shape[1]
    layer = model.get_submodule(name)
    channels = int(layer.out_features if isinstance(layer, torch.nn.Linear) else getattr(layer, "out_channels", 0))
    if kind == "softmax" and width != channels:
        raise TeacherError(
            f"{path}: the forward returns logits of width {width} but {name} has {channels} outputs; "
            "return that layer's rows as 'logits'"
        )
    if kind == "sigmoid" and (width == 0 or channels % width):
        raise TeacherError(f"{path}: logits of width {width} cannot come from {name} ({channels} channels)")
    teacher.num_classes = width - 1 if kind == "softmax" else width
    return teacher
