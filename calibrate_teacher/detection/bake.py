"""Bake a temperature into a detector's class logits: same format in and out, verified by a probe.

* ONNX: a ``Div`` by T on each class-logit tensor right before its ``Sigmoid`` (the ones the
  teacher reads its logits through, :mod:`._onnx_bypass`), or before the final ``Softmax`` of a
  named scores output. Objectness Sigmoids (YOLOX) are left alone; a Sigmoid whose elements are
  partly objectness and partly classes (YOLOv5 applies one to the whole head) cannot take a
  scalar ``Div`` and is refused. Inputs, outputs, metadata (class names, ``imgsz``), opset and
  dynamic axes are kept; ``calibrate_teacher.temperature`` is added to ``metadata_props``.
* State dict (safetensors / ``.pt``): the class-logit layer's weight and bias divided by T (in
  float64, rounded once), every other tensor and every key unchanged; safetensors metadata
  records ``calibrate_teacher.temperature`` and ``calibrate_teacher.head``.

The baked file is written into a staging folder, loaded back, and run next to the original on
the probe images: every image's boxes (and objectness) must be bit-identical and its class
logits equal ``original / T`` within ``1e-5 * max(1, max |original / T|)``. Only then is it
renamed into place (:mod:`calibrate_teacher._io`); nothing is overwritten without
``overwrite=True``. Pass real images as ``probe`` (a batch the data source made); the default is
two seeded random images of the model's input size, which the result's ``notes`` say.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._io import atomic_output, check_output, sha256_file
from calibrate_teacher._validate import validate_temperature
from calibrate_teacher.detection.base import BackgroundLayout, DetectionBatch, HeadKind
from calibrate_teacher.detection.load import load_detection_teacher
from calibrate_teacher.errors import BakeError, InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.detection._onnx import OnnxDetectionTeacher
    from calibrate_teacher.detection._torch import TorchDetectionTeacher

__all__ = ["DetectorBake", "bake_detector_temperature"]

META_TEMPERATURE = "calibrate_teacher.temperature"
META_HEAD = "calibrate_teacher.head"
TOLERANCE = 1e-5


@dataclass(frozen=True)
class DetectorBake:
    """What a detector bake wrote, and how the baked detector matched the original on the probe.

    Attributes:
        path: The baked model file.
        source: The detector baked.
        format: ``onnx``, ``safetensors`` or ``state_dict``.
        temperature: T.
        changed: What was divided by T: the ONNX class-logit tensors, or the state-dict keys.
        max_abs_error: ``max |baked - original / T|`` over the probe's class logits.
        tolerance: The bound it had to stay within.
        probe_shape: The probe images' shape.
        extra_files: Companion files (ONNX external data).
        notes: Remarks (a default probe, loading notes).
        sha256: SHA-256 of the baked file.
    """

    path: Path
    source: Path
    format: str
    temperature: float
    changed: tuple[str, ...]
    max_abs_error: float
    tolerance: float
    probe_shape: tuple[int, ...]
    extra_files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    sha256: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (paths as strings)."""
        return {
            "path": str(self.path),
            "source": str(self.source),
            "format": self.format,
            "temperature": self.temperature,
            "changed": list(self.changed),
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "boxes_identical": True,
            "probe_shape": list(self.probe_shape),
            "extra_files": [str(p) for p in self.extra_files],
            "notes": list(self.notes),
            "sha256": self.sha256,
        }


def bake_detector_temperature(
    teacher_path: str | os.PathLike[str],
    temperature: float,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    probe: torch.Tensor | Iterable[DetectionBatch] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    head: HeadKind | None = None,
    background: BackgroundLayout | None = None,
    boxes_output: str | None = None,
    scores_output: str | None = None,
    class_layer: str | None = None,
    device: str = "auto",
) -> DetectorBake:
    """Write a copy of the detector whose class logits are divided by ``temperature``, verified.

    Args:
        teacher_path: The detector (anything :func:`load_detection_teacher` reads).
        temperature: T, finite and > 0.
        out: The baked file (same suffix); default ``<stem>.calibrated<suffix>`` beside it.
        overwrite: Replace ``out`` if it exists.
        probe: Images ``[B, 3, H, W]`` as the model takes them, or detection batches (the first
            one is used); default: two seeded random images (noted).
        arch: The factory of a state-dict detector (see :func:`load_detection_teacher`).
        arch_kwargs: Its keyword arguments.
        head: The head kind, checked against the model.
        background: A softmax head's background column.
        boxes_output: ONNX named boxes output.
        scores_output: ONNX named scores output.
        class_layer: PyTorch class-logit layer, where not at a known name.
        device: Where the probe runs.

    Returns:
        A :class:`DetectorBake`.

    Raises:
        InvalidValueError: T is not finite and > 0, or ``out`` changes the suffix or is the input.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        TeacherError: the detector cannot be loaded.
        BakeError: T cannot be placed on the class logits alone, or the baked detector failed the check.
    """
    from calibrate_teacher.baking import default_baked_path
    from calibrate_teacher.detection._onnx import OnnxDetectionTeacher

    value = validate_temperature(temperature)
    source = Path(teacher_path)
    target = default_baked_path(source) if out is None else Path(out)
    if target.suffix.lower() != source.suffix.lower():
        raise InvalidValueError(
            f"{target}: the baked detector keeps the format of {source.name}; give a {source.suffix} path"
        )
    if target.exists() and target.resolve() == source.resolve():
        raise InvalidValueError(f"{target}: is the detector itself; write the baked one elsewhere")
    check_output(target, overwrite=overwrite)
    options: dict[str, object] = dict(
        arch=arch, arch_kwargs=arch_kwargs, head=head, background=background, boxes_output=boxes_output,
        scores_output=scores_output, class_layer=class_layer, device=device,
    )  # fmt: skip
    original = load_detection_teacher(source, **options)  # type: ignore[arg-type]
    notes = list(original.notes)
    images = _probe(original, probe, notes)
    with contextlib.ExitStack() as stack:
        mode = source.stat().st_mode & 0o777  # a copy of a private model stays private
        final = stack.enter_context(atomic_output(target, overwrite=overwrite, max_mode=mode))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
        stack.callback(shutil.rmtree, staging, ignore_errors=True)
        staged = staging / target.name
        if isinstance(original, OnnxDetectionTeacher):
            changed, extra = _bake_onnx(original, value, staged)
        else:
            changed, extra = _bake_state(original, value, staged), ()
        companions = [
            stack.enter_context(atomic_output(target.parent / f.name, overwrite=overwrite, max_mode=mode))
            for f in extra
        ]
        baked = load_detection_teacher(staged, **options)  # type: ignore[arg-type]
        error, bound = verify(original, baked, images, value)
        for staged_extra, temporary in zip(extra, companions, strict=True):
            os.replace(staged_extra, temporary)
        os.replace(staged, final)
    return DetectorBake(
        path=target,
        source=source,
        format=original.format,
        temperature=value,
        changed=changed,
        max_abs_error=error,
        tolerance=bound,
        probe_shape=tuple(images.shape),
        extra_files=tuple(target.parent / f.name for f in extra),
        notes=tuple(notes),
        sha256=sha256_file(target),
    )


def _probe(
    teacher: OnnxDetectionTeacher | TorchDetectionTeacher,
    probe: torch.Tensor | Iterable[DetectionBatch] | None,
    notes: list[str],
) -> torch.Tensor:
    import torch

    from calibrate_teacher.detection._onnx import OnnxDetectionTeacher, probe_images
    from calibrate_teacher.detection._torch import PROBE_SIZE

    if isinstance(probe, torch.Tensor):
        images = probe
    elif probe is not None:
        first = next(iter(probe), None)
        if not isinstance(first, DetectionBatch):
            raise InvalidValueError("probe: expected an image tensor [B, 3, H, W] or DetectionBatch objects")
        images = first.images
    else:
        size = teacher.image_size if isinstance(teacher, OnnxDetectionTeacher) else (PROBE_SIZE, PROBE_SIZE)
        notes.append(f"bake checked on 2 random {size[0]}x{size[1]} images; pass probe= (real images) to check on data")
        images = probe_images(2, size)
    if images.ndim != 4 or images.shape[0] == 0:
        raise InvalidValueError(f"probe: expected images [B, 3, H, W] with B >= 1, got {tuple(images.shape)}")
    return images


def verify(
    original: OnnxDetectionTeacher | TorchDetectionTeacher,
    baked: OnnxDetectionTeacher | TorchDetectionTeacher,
    images: torch.Tensor,
    temperature: float,
) -> tuple[float, float]:
    """Return (max error, bound) once boxes are identical and logits equal original / T.

    Raises:
        BakeError: a box or objectness differs, or a logit is off by more than the bound.
    """
    import torch

    before, after = original.detect(images), baked.detect(images)
    error, peak = 0.0, 1.0
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        same = torch.equal(a.boxes, b.boxes) and a.logits.shape == b.logits.shape
        if a.objectness is None or b.objectness is None:
            same = same and a.objectness is b.objectness
        else:
            same = same and torch.equal(a.objectness, b.objectness)
        if not same:
            raise BakeError(
                f"{original.path}: the baked detector's boxes or objectness differ on probe image {i}; nothing written"
            )
        expected = a.logits.double() / temperature
        if expected.numel():
            error = max(error, float((b.logits.double() - expected).abs().max()))
            peak = max(peak, float(expected.abs().max()))
    bound = TOLERANCE * peak
    if not error <= bound:  # also NaN
        raise BakeError(
            f"{original.path}: the baked detector's class logits are not original / T on the probe: "
            f"max |baked - original/T| = {error:.3g} > {bound:.3g}; nothing written"
        )
    return error, bound


def _bake_onnx(
    teacher: OnnxDetectionTeacher, temperature: float, staged: Path
) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    import onnx

    from calibrate_teacher.teachers._onnx import read_model
    from calibrate_teacher.teachers._onnx_graph import external_tensors, insert_division, merge_external_data

    model = read_model(teacher.path)
    tensors = class_logit_tensors(teacher)
    elem = next(o for o in model.graph.output if o.name == teacher.reading.output).type.tensor_type.elem_type
    for tensor in tensors:
        insert_division(model, tensor, temperature, elem)
    props = [p for p in model.metadata_props if p.key != META_TEMPERATURE]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_TEMPERATURE, repr(temperature)
    extra: tuple[Path, ...] = ()
    if external_tensors(model, teacher.path.parent):
        data = staged.with_name(staged.name + ".data")
        merge_external_data(model, teacher.path.parent, data)
        extra = (data,)
    onnx.save(model, str(staged))
    return tensors, extra


def class_logit_tensors(teacher: OnnxDetectionTeacher) -> tuple[str, ...]:
    """The tensors a bake divides: the class Sigmoids' inputs (objectness ones left out).

    With an objectness column (YOLOX), each Sigmoid is skipped alone on a probe to see which
    columns it feeds.

    Raises:
        BakeError: a Sigmoid feeds objectness and class columns both.
    """
    from calibrate_teacher.detection._onnx import _session, probe_images
    from calibrate_teacher.detection._onnx_bypass import bypass_sigmoids, name_nodes
    from calibrate_teacher.teachers._onnx import read_model

    r = teacher.reading
    if r.head == "softmax" or not r.objectness:
        return tuple(dict.fromkeys(r.logits_tensors))
    chosen: list[str] = []
    images = probe_images(1, teacher.image_size)
    for sigmoid, tensor in zip(r.sigmoids, r.logits_tensors, strict=True):
        model = read_model(teacher.path)
        name_nodes(model)
        bypass = bypass_sigmoids(model, r.output, only={sigmoid})
        assert bypass is not None  # the same graph gave this Sigmoid before
        session, _, _ = _session(model, teacher.path, "cpu", [])
        name = teacher.input_spec.name if teacher.input_spec is not None else None
        original, copy = session.run([r.output, bypass.logits_output], {name or "": images.numpy()})
        columns = {int(c) for c in (original != copy).nonzero()[-1]}
        if columns <= {4}:
            continue
        if 4 in columns:
            raise BakeError(
                f"{teacher.path}: the Sigmoid {sigmoid!r} makes objectness and class scores both, so a Div "
                "by T cannot reach the classes alone; export objectness and classes with separate Sigmoids"
            )
        chosen.append(tensor)
    return tuple(dict.fromkeys(chosen))


def _bake_state(teacher: TorchDetectionTeacher, temperature: float, staged: Path) -> tuple[str, ...]:
    import torch

    from calibrate_teacher.teachers._safetensors import _scale, load_checkpoint

    layer = teacher.model.get_submodule(teacher.class_layer)
    keys = [teacher.key_prefix + f"{teacher.class_layer}.{p}" for p, _ in layer.named_parameters(recurse=False)]
    if teacher.format == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors = load_file(teacher.path)
        with safe_open(str(teacher.path), "pt") as fh:
            metadata = dict(fh.metadata() or {})
        _scale(tensors, keys, temperature)
        metadata.update({META_TEMPERATURE: repr(temperature), META_HEAD: teacher.class_layer})
        save_file(tensors, str(staged), metadata=metadata)
    else:
        obj = load_checkpoint(teacher.path)
        if not isinstance(obj, dict):
            raise BakeError(f"{teacher.path}: the checkpoint is no longer a state dict; nothing written")
        _scale(obj if teacher.nested_key is None else obj[teacher.nested_key], keys, temperature)
        torch.save(obj, staged)
    return tuple(keys)
