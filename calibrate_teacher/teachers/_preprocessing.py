"""The preprocessing (and class list) a teacher file carries with it, read from beside the model.

:func:`find_model_preprocessing` returns the layers :func:`calibrate_teacher.data.open_data`
stacks under the CLI flags (``model_layers=``), lowest first; the first one found of each kind:

1. metadata the model carries, the first found of:

   * ONNX ``metadata_props["calibrate_teacher.preprocess"]``: our JSON keys, as a bake writes
     them (read with ``onnx.load(..., load_external_data=False)``);
   * a timm ``config.json`` beside the model (the Hub layout timm pushes): its ``pretrained_cfg``
     (or, in older files, the same keys at the top level), with ``model_args`` applied as
     timm applies them (``in_chans`` sets C; ``img_size`` sets H, W of a fixed-size model),
     under one more layer holding what timm itself would use for keys the file leaves out
     (``bicubic``, ``crop_pct`` 0.875, ``crop_mode`` ``center``, ImageNet mean and std);
   * a Hugging Face ``preprocessor_config.json`` (an ``AutoImageProcessor`` config), mapped
     to the same transform exactly (see :func:`hf_preprocess_values`); what our transform cannot
     reproduce is refused with an :class:`InputError`, never approximated;
2. the sidecar the user wrote: ``<model stem>.preprocess.json``, else ``preprocess.json``.

A Hugging Face model directory is read from inside: its ``preprocessor_config.json`` is the
metadata, ``preprocess.json`` in it the sidecar; its class names are ``classes.txt`` in it, else
``config.json`` ``id2label`` in index order (transformers' placeholder ``LABEL_0``,
``LABEL_1``... are no names: the directory then carries none).

Each layer is ``(values, origin, declared)``: the keys (raw, validated by the data side), one line
naming the file, and whether the values are metadata the model declares (the data side refuses a
sidecar whose ``input_size`` contradicts what the model declares).

Nothing here imports ``calibrate_teacher.data``: the data side validates and merges the layers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from calibrate_teacher.errors import CalibrateTeacherError, InputError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "CLASSES_KEY",
    "PREPROCESS_KEY",
    "ModelLayer",
    "classes_sidecar",
    "find_model_classes",
    "find_model_preprocessing",
    "hf_preprocess_values",
    "preprocess_sidecar",
    "set_onnx_metadata",
    "sidecar_input_size",
]

#: ONNX ``metadata_props`` keys a baked teacher carries (values: JSON).
PREPROCESS_KEY = "calibrate_teacher.preprocess"
CLASSES_KEY = "calibrate_teacher.classes"
_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
# PIL.Image.Resampling values, as Hugging Face processors store ``resample``.
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Processor classes whose integer ``size`` means a square (transformers' default_to_square=True)
# or the shortest edge (False); ``ViTFeatureExtractor`` and friends are the older names.
_SQUARE_SIZE = ("ViT", "DeiT", "Beit", "BEiT", "Data2VecVision")
_SHORT_EDGE_SIZE = ("ConvNext", "CLIP", "Bit", "MobileNetV1", "MobileNetV2", "Levit")


#: Builds the one-line error for a processor setting our transform cannot reproduce.
_Refuse = Callable[[str], InputError]


class ModelLayer(NamedTuple):
    """One preprocessing layer found beside a teacher.

    Attributes:
        values: Preprocessing keys (timm ``pretrained_cfg`` names; raw JSON values).
        origin: Where they came from, e.g. ``"teacher.preprocess.json beside the model"``.
        declared: True for metadata the model carries (config.json, ONNX metadata); False for
            a sidecar the user wrote.
    """

    values: dict[str, object]
    origin: str
    declared: bool


def find_model_preprocessing(model_path: str | os.PathLike[str]) -> tuple[ModelLayer, ...]:
    """The preprocessing layers a teacher file carries, lowest first (see the module docstring).

    Args:
        model_path: The teacher file.

    Returns:
        The layers; empty when nothing beside the model describes its preprocessing.

    Raises:
        InputError: a file is unreadable, or holds preprocessing that cannot be represented.
    """
    model = _anchor(Path(model_path))
    layers = list(_metadata_layers(model))
    sidecar = preprocess_sidecar(model)
    if sidecar is not None:
        values = _read_json(sidecar)
        if not isinstance(values, dict):
            raise InputError(f"{sidecar}: expected a JSON object of preprocessing keys")
        layers.append(ModelLayer(values, f"{sidecar} beside the model", False))
    return tuple(layers)


def preprocess_sidecar(model_path: str | os.PathLike[str]) -> Path | None:
    """``<stem>.preprocess.json`` beside the model, else ``preprocess.json``, if either exists.

    For a model directory: ``preprocess.json`` (or ``model.preprocess.json``) inside it.
    """
    model = _anchor(Path(model_path))
    for candidate in (model.with_name(f"{model.stem}.preprocess.json"), model.with_name("preprocess.json")):
        if candidate.is_file():
            return candidate
    return None


def classes_sidecar(model_path: str | os.PathLike[str]) -> Path:
    """Where a teacher's class list sits: ``<stem>.classes.txt`` beside the model.

    For a model directory: ``classes.txt`` inside it.
    """
    model = Path(model_path)
    if model.is_dir():
        return model / "classes.txt"
    return model.with_name(f"{model.stem}.classes.txt")


def _anchor(model: Path) -> Path:
    """The path whose siblings are a model's metadata: a directory's files are inside it."""
    return model / "model" if model.is_dir() else model


def find_model_classes(model_path: str | os.PathLike[str]) -> tuple[tuple[str, ...], str] | None:
    """The class names a teacher carries: ``<stem>.classes.txt``, else ONNX ``metadata_props``.

    A Hugging Face model directory: ``classes.txt`` in it, else ``config.json`` ``id2label`` in
    index order, unless those are transformers' placeholders ``LABEL_0``, ``LABEL_1``...

    Returns:
        ``(names, origin)``, or None when the teacher carries no class list.

    Raises:
        InputError: the file or the metadata entry cannot be read.
    """
    file = classes_sidecar(model_path)
    if file.is_file():
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: cannot read the class list ({exc}); one class per line") from exc
        return tuple(line.strip() for line in lines if line.strip()), f"{file} beside the model"
    model = Path(model_path)
    if model.is_dir():
        return _id2label(model / "config.json")
    text = _onnx_metadata(model).get(CLASSES_KEY)
    if text is None:
        return None
    names = _parse_json(text, f"{model} metadata_props[{CLASSES_KEY!r}]")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise InputError(f"{model}: metadata_props[{CLASSES_KEY!r}] is not a JSON list of names; re-bake it")
    return tuple(names), f"metadata_props[{CLASSES_KEY!r}] of {model.name}"


def _id2label(config: Path) -> tuple[tuple[str, ...], str] | None:
    """``id2label`` names in index order, or None (no file, no map, or placeholders only)."""
    if not config.is_file():
        return None
    data = _read_json(config)
    mapping = data.get("id2label") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        return None
    try:
        by_index = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(f"{config}: id2label keys must be class indices ({exc}); re-save the model") from exc
    if sorted(by_index) != list(range(len(by_index))):
        raise InputError(
            f"{config}: id2label indices are {sorted(by_index)}, not 0..{len(by_index) - 1}; re-save the model"
        )
    names = tuple(by_index[i] for i in range(len(by_index)))
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None  # transformers' placeholders: the model carries no names
    return names, f"{config} id2label"


def sidecar_input_size(model_path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The ``(C, H, W)`` the files beside a model give, if any (a hint for shape probing).

    TorchScript files and state dicts do not record their input shape; their loaders ask here
    before guessing. Unreadable files give None (the data step reports them).
    """
    try:
        layers = find_model_preprocessing(model_path)
    except CalibrateTeacherError:
        return None
    for layer in reversed(layers):
        size = layer.values.get("input_size")
        if isinstance(layer.values.get("pretrained_cfg"), dict):
            size = layer.values["pretrained_cfg"].get("input_size", size)  # type: ignore[attr-defined]
        if isinstance(size, list) and len(size) == 3 and all(type(d) is int and d > 0 for d in size):
            return tuple(size)
    return None


def set_onnx_metadata(
    model: onnx.ModelProto,
    *,
    preprocess: Mapping[str, object] | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Record preprocessing keys and class names in ``model.metadata_props`` (in place).

    Existing entries with the same keys are replaced; others are kept.
    """
    entries = {}
    if preprocess is not None:
        entries[PREPROCESS_KEY] = json.dumps(dict(preprocess), sort_keys=False)
    if classes is not None:
        entries[CLASSES_KEY] = json.dumps(list(classes), ensure_ascii=False)
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


# --- metadata the model carries ---------------------------------------------------------------


def _metadata_layers(model: Path) -> list[ModelLayer]:
    text = _onnx_metadata(model).get(PREPROCESS_KEY)
    if text is not None:
        origin = f"metadata_props[{PREPROCESS_KEY!r}] of {model}"
        values = _parse_json(text, origin)
        if not isinstance(values, dict):
            raise InputError(f"{origin}: expected a JSON object of preprocessing keys; re-bake the model")
        return [ModelLayer(values, origin, True)]
    hub = model.with_name("config.json")
    try:
        data = _read_json(hub) if hub.is_file() else None
    except InputError:
        data = None  # many tools write a config.json; an unreadable one is not ours to judge
    if isinstance(data, dict) and _is_timm_config(data):
        values, defaults = _timm_values(data, hub)
        layers = [ModelLayer(values, f"{hub} (timm pretrained_cfg) beside the model", True)]
        if defaults:
            layers.insert(0, ModelLayer(defaults, f"timm's defaults for {hub.name}", True))
        return layers
    processor = model.with_name("preprocessor_config.json")
    if processor.is_file():
        data = _read_json(processor)
        if not isinstance(data, dict):
            raise InputError(f"{processor}: expected a JSON object (a Hugging Face image processor config)")
        kind = str(data.get("image_processor_type") or data.get("feature_extractor_type") or "image processor")
        values = hf_preprocess_values(data, source=str(processor))
        return [ModelLayer(values, f"{processor} (Hugging Face {kind}) beside the model", True)]
    return []


def _onnx_metadata(model: Path) -> dict[str, str]:
    if model.suffix.lower() != ".onnx" or not model.is_file():
        return {}
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return {}  # not our error to report: loading the teacher says what is wrong with it
    return {p.key: p.value for p in proto.metadata_props}


def _is_timm_config(data: Mapping[str, object]) -> bool:
    # timm writes "architecture" (transformers writes "architectures"), and either a
    # pretrained_cfg dict or, in older versions, the pretrained_cfg keys at the top level.
    if isinstance(data.get("pretrained_cfg"), dict):
        return True
    return "architecture" in data and any(k in data for k in _KEYS)


def _timm_values(data: Mapping[str, object], file: Path) -> tuple[dict[str, object], dict[str, object]]:
    """(the keys the file gives, timm's defaults for the rest), read as timm reads them."""
    inner = data.get("pretrained_cfg")
    cfg: Mapping[str, object] = inner if isinstance(inner, dict) else data
    values = {k: cfg[k] for k in _KEYS if cfg.get(k) is not None}
    args = data.get("model_args")
    if isinstance(args, dict):
        # As timm's _parse_model_cfg: in_chans sets C, img_size sets H, W of a fixed-size model.
        size = values.get("input_size")
        dims = list(size) if isinstance(size, list | tuple) and len(size) == 3 else None
        if args.get("in_chans") is not None:
            dims = [args["in_chans"], *(dims or [3, 224, 224])[1:]]
        img = args.get("img_size")
        if img is not None and cfg.get("fixed_input_size"):
            hw = [img, img] if isinstance(img, int) else list(img)
            dims = [(dims or [3])[0], *hw]
        if dims is not None:
            values["input_size"] = dims
    mode = values.get("crop_mode")
    if mode is not None and mode not in ("center", "squash"):
        raise InputError(
            f"{file}: timm crop_mode {mode!r} cannot be reproduced (center and squash can); write "
            "<model stem>.preprocess.json beside the model or pass --crop-mode"
        )
    defaults: dict[str, object] = {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
    size = values.get("input_size")
    if not (isinstance(size, list | tuple) and size and size[0] != 3):
        defaults.update(mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
    return values, {k: v for k, v in defaults.items() if k not in values}


# --- Hugging Face image processors ------------------------------------------------------------


def hf_preprocess_values(config: Mapping[str, object], *, source: str) -> dict[str, object]:
    """Map a Hugging Face image processor config to our keys, exactly, or refuse.

    The processor resizes (``size``: ``{"height", "width"}`` exactly, or ``{"shortest_edge"}``
    keeping the aspect ratio), optionally centre-crops (``do_center_crop`` + ``crop_size``;
    ConvNeXt: ``crop_pct``), rescales by ``rescale_factor`` and normalises with ``image_mean`` /
    ``image_std``; ``resample`` is a Pillow filter number. That is our transform with
    ``crop_mode`` ``squash`` (exact resize) or ``center`` (shortest edge), ``crop_pct`` = crop /
    resize, and the rescale folded into ``mean`` and ``std``. Keys the file leaves out
    (``resample``, ``image_mean``...) are left out here, so the data side reports them as
    defaults. One difference remains: Hugging Face puts the crop at ``floor(margin / 2)``,
    torchvision and we at ``round(margin / 2)``, a one-pixel shift where the margin is 3 modulo 4.

    Args:
        config: The parsed ``preprocessor_config.json``.
        source: The file, named in errors.

    Returns:
        Our preprocessing keys.

    Raises:
        InputError: a setting our transform cannot reproduce (no resize, padding, BGR, a
            shortest-edge resize without a square crop, a crop that is not the same fraction of
            both sides, ``crop_pct`` outside ConvNeXt processors).
    """
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    fix = "write <model stem>.preprocess.json beside the model (or pass --preprocess)"

    def refuse(what: str) -> InputError:
        return InputError(f"{source}: {what} cannot be reproduced by our transform; {fix}")

    for flag in ("do_pad", "do_flip_channel_order"):
        if config.get(flag):
            raise refuse(f"{flag}=true")
    if config.get("do_resize") is False:
        raise refuse("do_resize=false (images fed at their own size)")
    # exact: resize to h x w; else the shortest edge goes to h (== w), keeping the aspect ratio.
    exact, h, w = _hf_resize(config.get("size"), kind, refuse)
    crop: tuple[int, int] | None = None
    crop_pct = config.get("crop_pct")
    if crop_pct is not None:
        if not kind.startswith("ConvNext"):
            raise refuse(f"crop_pct with {kind or 'this processor'} (only ConvNeXt's is mapped)")
        if exact:
            raise refuse("crop_pct with an exact height/width size")
        if h < 384:  # ConvNeXt: shortest edge to int(edge / crop_pct), crop edge x edge
            crop = (h, h)
            h = w = int(h / _number(crop_pct, "crop_pct", refuse))
        else:  # ... and from 384 on, a plain resize to edge x edge
            exact = True
    elif config.get("do_center_crop"):
        crop = _hf_crop(config.get("crop_size"), refuse)
    if not exact and crop is None:
        raise refuse("a shortest_edge resize without a centre crop (the output size varies)")
    ch, cw = crop if crop is not None else (h, w)
    if not exact and ch != cw:
        raise refuse(f"a shortest_edge resize with a non-square crop {ch}x{cw}")
    values: dict[str, object] = {
        "crop_mode": "squash" if exact else "center",
        "crop_pct": _fraction(ch, h, cw, w, refuse),
    }
    resample = config.get("resample")
    if resample is not None:
        if resample not in _PIL_FILTERS:
            raise refuse(f"resample={resample!r}")
        values["interpolation"] = _PIL_FILTERS[resample]
    mean, std = config.get("image_mean"), config.get("image_std")
    rescale = 1.0
    if config.get("do_rescale", True):
        rescale = _number(config.get("rescale_factor", 1 / 255), "rescale_factor", refuse)
    # Ours computes (x / 255 - mean) / std; theirs (x * r - m) / s: mean = m / (255 r), std = s / (255 r).
    k = 255.0 * rescale
    k = 1.0 if math.isclose(k, 1.0, rel_tol=1e-9) else k
    # Processors emit RGB; a one-value image_mean is a grayscale model's.
    channels = 1 if isinstance(mean, list) and len(mean) == 1 else 3
    if config.get("do_normalize", True) is False:
        mean, std = [0.0] * channels, [1.0] * channels
    if mean is None or std is None:
        if k != 1.0:
            raise refuse(f"rescale_factor={rescale} without image_mean and image_std")
        if mean is not None or std is not None:
            raise refuse("image_mean without image_std (or the reverse)")
    else:
        values["mean"] = [_number(m, "image_mean", refuse) / k for m in _as_list(mean)]
        values["std"] = [_number(s, "image_std", refuse) / k for s in _as_list(std)]
    values["input_size"] = [channels, ch, cw]
    return values


def _hf_resize(size: object, kind: str, refuse: _Refuse) -> tuple[bool, int, int]:
    """(exact, h, w): resize to h x w, or (not exact) the shortest edge to h == w."""
    if isinstance(size, int) and not isinstance(size, bool):
        if kind.startswith(_SQUARE_SIZE):
            return True, size, size
        if kind.startswith(_SHORT_EDGE_SIZE):
            return False, size, size
        raise refuse(f"an integer size with {kind or 'an unnamed processor'} (square or shortest edge?)")
    if isinstance(size, dict):
        if set(size) == {"height", "width"}:
            return True, _pixels(size["height"], refuse), _pixels(size["width"], refuse)
        if set(size) == {"shortest_edge"}:
            edge = _pixels(size["shortest_edge"], refuse)
            return False, edge, edge
    raise refuse(f"size={size!r}")


def _hf_crop(crop: object, refuse: _Refuse) -> tuple[int, int]:
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop, crop
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return _pixels(crop["height"], refuse), _pixels(crop["width"], refuse)
    raise refuse(f"crop_size={crop!r}")


def _fraction(ch: int, h: int, cw: int, w: int, refuse: _Refuse) -> float:
    """The crop_pct p with floor(ch / p) == h and floor(cw / p) == w, if one exists."""
    if ch * w != cw * h:
        raise refuse(f"a {ch}x{cw} crop of a {h}x{w} resize (not the same fraction of both sides)")
    p = ch / h
    for _ in range(4):  # ch / p can land a hair under h in floating point: nudge p down
        if math.floor(ch / p) == h and math.floor(cw / p) == w:
            return p
        p = math.nextafter(p, 0.0)
    raise refuse(f"a {ch}x{cw} crop of a {h}x{w} resize")


def _number(value: object, key: str, refuse: _Refuse) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise refuse(f"{key}={value!r}")
    return float(value)


def _pixels(value: object, refuse: _Refuse) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise refuse(f"size {value!r}")
    return value


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else [value]


# --- files ------------------------------------------------------------------------------------


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it ({exc}); fix or remove the file") from exc
    return _parse_json(text, str(path))


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON ({exc}); fix or remove it") from exc
