"""Image preprocessing described with timm's ``pretrained_cfg`` keys, and where it comes from.

A teacher must see its validation images exactly as it saw them in training, so the recipe is a
small, explicit config (the keys timm publishes with every pretrained model):

``input_size``
    ``(C, H, W)``. ``C = 1`` converts images to grayscale (Pillow mode ``L``), ``C = 3`` to RGB
    (alpha is dropped, as timm's and torchvision's loaders do).
``interpolation``
    Pillow's resampling filter: ``nearest``, ``bilinear``, ``bicubic``, ``box``, ``hamming``,
    ``lanczos``.
``crop_pct``
    The resize target is ``floor(size / crop_pct)`` per side, then the centre ``H x W`` is cut.
``crop_mode``
    ``center`` (keep the aspect ratio: the shorter side goes to the resize target) or ``squash``
    (both sides go to their resize targets, the aspect ratio is not kept).
``mean``, ``std``
    Per-channel; pixels are scaled to ``[0, 1]`` and then mapped to ``(x - mean) / std``.

:mod:`calibrate_teacher.data.transform` applies it to images (timm's evaluation transform,
with Pillow and torch only).

The config is stacked from layers, lowest first, each setting the keys it gives: the teacher's
input shape (``input_size``); the layers found beside the model (its metadata: a timm
``config.json``, a Hugging Face ``preprocessor_config.json``, ONNX ``metadata_props``; then the
sidecar ``<model stem>.preprocess.json`` / ``preprocess.json``), which the caller passes in as
``model_layers`` (the lookup is
:func:`calibrate_teacher.teachers._preprocessing.find_model_preprocessing`: ``data`` never
imports ``teachers``); an explicit file or :class:`PreprocessConfig`; and the flags.
:func:`resolve_preprocess` returns the config, a line saying where each key came from
(``defaults`` for the keys no layer set) and a warning naming those keys and the fix, so every
report states the preprocessing it used and none is guessed silently.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    from calibrate_teacher.teachers.base import InputSpec

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "INTERPOLATIONS",
    "ModelLayer",
    "PreprocessConfig",
    "ResolvedPreprocess",
    "merge_model_layers",
    "resolve_preprocess",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
#: Pillow resampling filters by name.
Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
#: ``center``: resize the short side, keep the aspect ratio, crop; ``squash``: resize both sides.
CropMode = Literal["center", "squash"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)
FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
# Other keys a timm pretrained_cfg (or a hub config.json) carries; read past, never an error.
# fmt: off
_TIMM_KEYS = frozenset({
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
    "custom_load", "test_input_size", "min_input_size", "fixed_input_size", "test_crop_pct",
    "num_classes", "label_offset", "label_names", "label_descriptions", "pool_size",
    "test_pool_size", "first_conv", "classifier", "license", "description", "origin_url",
    "paper_name", "paper_ids", "notes", "num_features", "global_pool", "model_args",
    "pretrained_cfg", "input_shape",
})
# fmt: on


def _default_stats(channels: int, rgb: tuple[float, float, float]) -> tuple[float, ...]:
    # timm's ImageNet statistics for RGB; for any other channel count, their channel average
    # (a grayscale model adapted from an RGB one sees roughly that distribution).
    if channels == 3:
        return rgb
    return (round(sum(rgb) / 3, 6),) * channels


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become teacher inputs (timm ``pretrained_cfg`` keys).

    ``mean`` and ``std`` may be given with one value (used for every channel) or one per
    channel; left empty they take timm's ImageNet defaults (their channel average when
    ``C != 3``). After construction they always hold ``C`` values.

    Attributes:
        input_size: ``(C, H, W)``; ``C`` is 1 (grayscale) or 3 (RGB).
        interpolation: Pillow resampling filter name (see :data:`INTERPOLATIONS`).
        crop_pct: Fraction of the resized image kept by the centre crop, in ``(0, 1]``
            (values above 1 pad with zeros, as torchvision does).
        crop_mode: ``center`` (keep the aspect ratio) or ``squash``.
        mean: Per-channel mean subtracted from pixels in ``[0, 1]``.
        std: Per-channel standard deviation the result is divided by.

    Example:
        >>> PreprocessConfig(input_size=(1, 16, 16), mean=(0.5,), std=(0.25,)).to_json()["mean"]
        [0.5]
    """

    input_size: tuple[int, int, int]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        size = tuple(self.input_size)
        if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            raise InvalidValueError(
                f"input_size: expected three positive integers (C, H, W), got {self.input_size!r}"
            )
        channels = size[0]
        if channels not in (1, 3):
            raise InvalidValueError(
                f"input_size: images give 1 (grayscale) or 3 (RGB) channels, got C = {channels}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidValueError(
                f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.crop_mode not in CROP_MODES:
            raise InvalidValueError(
                f"crop_mode: expected one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}"
            )
        if not (math.isfinite(self.crop_pct) and 0 < self.crop_pct <= 2):
            raise InvalidValueError(f"crop_pct: expected a number in (0, 2], got {self.crop_pct!r}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        for name, default in (("mean", IMAGENET_DEFAULT_MEAN), ("std", IMAGENET_DEFAULT_STD)):
            values = tuple(float(v) for v in getattr(self, name))
            if not values:
                values = _default_stats(channels, default)
            elif len(values) == 1:
                values = values * channels
            elif len(values) != channels:
                raise InvalidValueError(
                    f"{name}: has {len(values)} values but input_size {size} has {channels} "
                    f"channel(s); give 1 or {channels} values"
                )
            if not all(math.isfinite(v) for v in values) or (
                name == "std" and not all(v > 0 for v in values)
            ):
                raise InvalidValueError(f"{name}: values must be finite (std > 0), got {values}")
            object.__setattr__(self, name, values)

    def to_json(self) -> dict[str, object]:
        """Return the config as a JSON-ready dict with timm's key names.

        Returns:
            ``{"input_size": [C, H, W], "interpolation": ..., "crop_pct": ...,
            "crop_mode": ..., "mean": [...], "std": [...]}``.
        """
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object], *, source: str) -> PreprocessConfig:
        """Build a config from timm ``pretrained_cfg``-style keys.

        A dict holding a ``pretrained_cfg`` entry (a timm / Hugging Face ``config.json``) is
        read through it. Other known timm keys (``url``, ``num_classes``...) are ignored;
        unknown keys are refused, so a typo never passes silently.

        Args:
            d: The keys; ``input_size`` is required, the rest default.
            source: Where ``d`` came from, named in error messages.

        Returns:
            The validated config.

        Raises:
            InputError: a key is unknown, ``input_size`` is missing, or a value is invalid.
        """
        values = _read_keys(d, source=source)
        if "input_size" not in values:
            raise InputError(
                f'{source}: no input_size; add "input_size": [C, H, W] (e.g. [3, 224, 224])'
            )
        return _build(values, source=source)


def _read_keys(d: Mapping[str, object], *, source: str) -> dict[str, object]:
    if not isinstance(d, Mapping):
        raise InputError(
            f"{source}: expected a JSON object of preprocessing keys, got {type(d).__name__}"
        )
    inner = d.get("pretrained_cfg")
    if isinstance(inner, Mapping):
        d = inner
    out: dict[str, object] = {}
    for key, value in d.items():
        if key in FIELDS:
            if value is not None:
                out[key] = value
        elif key not in _TIMM_KEYS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(
                f"{source}: unknown preprocessing key {key!r}; {hint}"
                f"known keys: {', '.join(FIELDS)}"
            )
    return out


def _build(values: Mapping[str, object], *, source: str) -> PreprocessConfig:
    kwargs: dict[str, Any] = {}
    try:
        for key, value in values.items():
            if key == "input_size":
                kwargs[key] = tuple(_as_int(v) for v in _as_list(value, key))
            elif key in ("mean", "std"):
                kwargs[key] = tuple(float(_as_number(v, key)) for v in _as_list(value, key))
            elif key == "crop_pct":
                kwargs[key] = float(_as_number(value, key))
            else:
                if not isinstance(value, str):
                    raise InvalidValueError(f"{key}: expected a string, got {value!r}")
                kwargs[key] = value.lower()
        return PreprocessConfig(**kwargs)
    except InvalidValueError as exc:
        raise InputError(f"{source}: {exc}") from exc


def _as_list(value: object, key: str) -> list[object]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list | tuple):
        return list(value)
    raise InvalidValueError(f"{key}: expected a number or a list of numbers, got {value!r}")


def _as_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidValueError(f"input_size: expected integers, got {value!r}")
    return int(value)


#: One layer of preprocessing keys found beside a teacher: ``(values, origin, declared)``, as
#: :func:`calibrate_teacher.teachers._preprocessing.find_model_preprocessing` returns them
#: (``declared``: metadata the model carries, not a sidecar the user wrote).
ModelLayer = tuple[Mapping[str, object], str, bool]


@dataclass(frozen=True)
class ResolvedPreprocess:
    """The preprocessing for a teacher, where each key came from, and what to warn about.

    Attributes:
        config: The config to apply.
        origin: One line naming each layer and its keys, ``defaults`` last, e.g.
            ``"input shape of m.onnx: input_size; defaults: interpolation, crop_pct, ..."``.
        from_defaults: The keys no layer set (they hold the :class:`PreprocessConfig` defaults).
        warnings: One-line warnings for stderr and reports: set when ``from_defaults`` is
            not empty, naming the keys and the fix.
    """

    config: PreprocessConfig
    origin: str
    from_defaults: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def resolve_preprocess(
    *,
    preprocess: str | os.PathLike[str] | PreprocessConfig | None = None,
    overrides: Mapping[str, object] | None = None,
    model_layers: Sequence[ModelLayer] = (),
    model_path: str | os.PathLike[str] | None = None,
    input_spec: InputSpec | None = None,
) -> ResolvedPreprocess:
    """Stack the preprocessing layers for a teacher and say where each key came from.

    Layers, lowest first, each setting the keys it gives: the teacher's input shape
    (``input_size`` only, where all of C, H, W are fixed); ``model_layers`` (what the files
    beside the model give: its metadata, then the sidecar); ``preprocess`` (a JSON file or a
    config); then ``overrides`` (the CLI flags). Keys no layer sets take the
    :class:`PreprocessConfig` defaults, and the result's ``warnings`` says so. This module
    does not look beside the model itself: the caller passes what
    ``teachers._preprocessing.find_model_preprocessing`` found.

    Args:
        preprocess: An explicit JSON file or config.
        overrides: Single keys that win over everything (e.g. ``{"crop_pct": 1.0}``).
        model_layers: ``(values, origin, declared)`` layers found beside the model, lowest first.
        model_path: The teacher file, named in origins and messages.
        input_spec: The teacher's input spec, to fill ``input_size``.

    Returns:
        A :class:`ResolvedPreprocess`.

    Raises:
        InputError: a file or layer is missing or invalid, a sidecar's ``input_size``
            contradicts the one the model's metadata declares, or nothing gives an
            ``input_size``.
    """
    values: dict[str, object] = {}
    origin: dict[str, str] = {}  # key -> the layer that set it
    model_name = Path(model_path).name if model_path is not None else "the teacher"
    spec_size = _spec_input_size(input_spec)
    if spec_size is not None:
        values["input_size"] = spec_size
        origin["input_size"] = f"input shape of {model_name}"
    declared: tuple[object, str] | None = None  # the input_size the model's metadata declares
    for layer_values, label, is_declared in model_layers:
        layer = _read_keys(layer_values, source=label)
        if is_declared and "input_size" in layer:
            declared = (layer["input_size"], label)
        values.update(layer)
        _assign(origin, layer, label)
    if isinstance(preprocess, PreprocessConfig):
        explicit, label = preprocess.to_json(), "the given config"
    elif preprocess is not None:
        explicit, label = _read_file(Path(preprocess)), str(preprocess)
    else:
        explicit, label = {}, ""
    values.update(explicit)
    _assign(origin, explicit, label)
    if overrides:
        unknown = [k for k in overrides if k not in FIELDS]
        if unknown:
            raise InputError(
                f"preprocessing override {unknown[0]!r}: unknown key; "
                f"known keys: {', '.join(FIELDS)}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        _assign(origin, given, "overrides")
    if "input_size" not in values:
        raise InputError(
            f"cannot tell the input size for {model_name}: the model does not fix it and no "
            "preprocessing file gives it; pass a preprocess JSON file (--preprocess), an input "
            "size (--input-size C,H,W), or write <model stem>.preprocess.json beside the model"
        )
    config = _build(values, source=" + ".join(dict.fromkeys(origin.values())))
    if declared is not None:
        _check_declared_size(config, declared, origin["input_size"], model_layers)
    defaults = tuple(k for k in FIELDS if k not in origin)
    warnings = (_defaults_warning(defaults, origin, model_path),) if defaults else ()
    return ResolvedPreprocess(config, _describe_origin(origin), defaults, warnings)


def merge_model_layers(model_layers: Sequence[ModelLayer]) -> dict[str, object]:
    """The keys a teacher's files give, validated and merged (higher layers win).

    What a bake writes beside the baked teacher, so that it is read with exactly these keys.

    Raises:
        InputError: a layer holds an unknown key or an invalid value.
    """
    merged: dict[str, object] = {}
    for layer_values, label, _ in model_layers:
        merged.update(_read_keys(layer_values, source=label))
    if merged:
        # Check the values as a config would (a stand-in size where none is given).
        stats = merged.get("mean", merged.get("std"))
        channels = len(stats) if isinstance(stats, list) and len(stats) in (1, 3) else 3
        probe = {"input_size": [channels, 1, 1], **merged}
        _build(probe, source=" + ".join(dict.fromkeys(label for _, label, _ in model_layers)))
    return merged


def _check_declared_size(
    config: PreprocessConfig,
    declared: tuple[object, str],
    chosen_by: str,
    model_layers: Sequence[ModelLayer],
) -> None:
    # A sidecar contradicting the size the model declares is a stale or wrong file: refuse
    # rather than pick one. An explicit --preprocess / --input-size is the user's choice.
    size, label = declared
    sidecars = {lab for _, lab, is_declared in model_layers if not is_declared}
    if chosen_by not in sidecars:
        return
    want = _build({"input_size": size}, source=label).input_size
    if want != config.input_size:
        raise InputError(
            f"{chosen_by} sets input_size {list(config.input_size)} but {label} declares "
            f"{list(want)}; make them agree, or pass --input-size C,H,W to choose"
        )


def _defaults_warning(
    keys: Sequence[str], origin: Mapping[str, str], model_path: str | os.PathLike[str] | None
) -> str:
    files = [label for label in dict.fromkeys(origin.values()) if not label.startswith("input shape of ")]
    if model_path is None:
        reason = f"not given by {', '.join(files)}" if files else "no preprocessing given"
        fix = "write a preprocess JSON file and pass --preprocess"
    else:
        model = Path(model_path)
        reason = (
            f"not given by {', '.join(files)}"
            if files
            else f"no sidecar or model metadata found beside {model.name}"
        )
        fix = f"write {model.stem}.preprocess.json beside the model or pass --preprocess"
    flags = "/".join(f"--{k.replace('_', '-')}" for k in keys)
    return f"preprocessing: {', '.join(keys)} from defaults ({reason}); {fix} (or {flags})"


def _assign(origin: dict[str, str], keys: Iterable[str], label: str) -> None:
    # Re-inserted, so the dict's order is the order of the layers that set the keys last.
    for key in keys:
        origin.pop(key, None)
        origin[key] = label


def _describe_origin(origin: Mapping[str, str]) -> str:
    # Layers in the order they were applied, defaults last; keys in timm's order within each.
    groups: dict[str, list[str]] = {label: [] for label in origin.values()}
    groups["defaults"] = []
    for key in FIELDS:
        groups[origin.get(key, "defaults")].append(key)
    groups = {label: keys for label, keys in groups.items() if keys}
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{label}: {', '.join(keys)}" for label, keys in groups.items())


def _spec_input_size(spec: InputSpec | None) -> list[int] | None:
    if spec is None or len(spec.shape) != 4:
        return None
    dims = spec.shape[1:]
    if any(d is None for d in dims) or dims[0] not in (1, 3):
        return None
    return [int(d) for d in dims if d is not None]



def _find_sidecar(model_path: str | os.PathLike[str] | None) -> Path | None:  # deprecated, see above
    if model_path is None:
        return None
    model = Path(model_path)
    for candidate in (
        model.with_name(model.stem + ".preprocess.json"),
        model.with_name("preprocess.json"),
    ):
        if candidate.is_file():
            return candidate
    hub = model.with_name("config.json")
    if hub.is_file():
        try:
            data = json.loads(hub.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # someone else's config.json; not ours to judge
        if isinstance(data, dict) and isinstance(data.get("pretrained_cfg"), dict):
            return hub
    return None


def _read_file(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise InputError(f"{path}: no such preprocessing file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from exc
    return _read_keys(data, source=str(path))
