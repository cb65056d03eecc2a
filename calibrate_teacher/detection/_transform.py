"""Detection preprocessing: ultralytics' letterbox, or a plain resize with mean/std normalisation.

Both map an original image of ``w x h`` pixels to a model input of ``W x H`` and record the map
back as an :class:`~calibrate_teacher.detection.base.ImageTransform`
(``x_in = x_orig * scale + pad``).

``letterbox`` reproduces ultralytics' ``LetterBox(auto=False, center=True, scaleup=True)``
(``ultralytics/data/augment.py``): ``r = min(H / h, W / w)``; the image is resized to
``(round(w r), round(h r))`` (Python's ``round``); the padding ``dw = (W - new_w) / 2`` gives
``left = round(dw - 0.1)`` and ``right = round(dw + 0.1)`` (likewise ``top`` / ``bottom``), filled
with 114 in every channel; pixels are divided by 255 (RGB, no mean/std). The map back is
ultralytics' ``scale_boxes``: ``scale = r`` on both axes, ``pad = (left, top)``. The resize uses
Pillow's bilinear filter where ultralytics uses OpenCV's ``INTER_LINEAR`` (OpenCV is not a
dependency): the geometry is identical, pixel values of a downscaled image differ slightly
(Pillow antialiases).

``resize`` squashes the image to ``W x H`` (aspect not kept, as torchvision's detection
transforms at a fixed size and many ONNX exports do), scales to ``[0, 1]`` and normalises with
``mean`` / ``std``; the map back is ``scale = (W / w, H / h)``, ``pad = 0``.

The spec comes from the caller (flags, a sidecar or model metadata): ``{"mode": "letterbox",
"input_size": [H, W]}`` or ``{"mode": "resize", "input_size": [H, W], "mean": [...], "std":
[...]}``; every key it lacks takes a default that :func:`parse_detection_preprocess` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.detection.base import ImageTransform
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DetectionPreprocess",
    "letterbox_geometry",
    "parse_detection_preprocess",
    "preprocess_detection_image",
]

PreprocessMode = Literal["letterbox", "resize"]
#: ultralytics' default image size.
DEFAULT_INPUT_SIZE = (640, 640)
#: ultralytics' letterbox fill value (per channel, 0-255).
PAD_VALUE = 114
_RESIZE_DEFAULT_MEAN = (0.0, 0.0, 0.0)
_RESIZE_DEFAULT_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class DetectionPreprocess:
    """How a detection data source turns an image into a model input.

    Attributes:
        mode: ``letterbox`` (keep the aspect ratio, pad 114, divide by 255) or ``resize``.
        input_size: ``(H, W)`` of the model input.
        mean: Per-channel mean subtracted from pixels in ``[0, 1]`` (``resize`` only).
        std: Per-channel std the result is divided by (``resize`` only).
    """

    mode: PreprocessMode = "letterbox"
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, float, float] = _RESIZE_DEFAULT_MEAN
    std: tuple[float, float, float] = _RESIZE_DEFAULT_STD

    def __post_init__(self) -> None:
        if self.mode not in ("letterbox", "resize"):
            raise InvalidValueError(f"preprocess mode: expected letterbox or resize, got {self.mode!r}")
        size = tuple(self.input_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise InvalidValueError(
                f"preprocess input_size: expected [H, W], two positive integers, got {self.input_size!r}"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise InvalidValueError(f"preprocess {name}: expected 3 values (RGB), got {list(values)}")
        if any(s <= 0 for s in self.std):
            raise InvalidValueError(f"preprocess std: every value must be > 0, got {list(self.std)}")
        if self.mode == "letterbox" and (self.mean != _RESIZE_DEFAULT_MEAN or self.std != _RESIZE_DEFAULT_STD):
            raise InvalidValueError("preprocess: mean/std apply to mode 'resize' only; letterbox divides by 255")

    def to_json(self) -> dict[str, object]:
        """The spec as JSON (``mean`` / ``std`` only for ``resize``)."""
        out: dict[str, object] = {"mode": self.mode, "input_size": list(self.input_size)}
        if self.mode == "letterbox":
            out["pad_value"] = PAD_VALUE
        else:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def parse_detection_preprocess(
    spec: Mapping[str, object] | DetectionPreprocess | None,
) -> tuple[DetectionPreprocess, tuple[str, ...]]:
    """Build the preprocessing from a spec; also return the keys that took defaults.

    Raises:
        InvalidValueError: an unknown key or mode, or a bad value.

    Example:
        >>> parse_detection_preprocess({"mode": "letterbox"})[1]
        ('input_size',)
    """
    if isinstance(spec, DetectionPreprocess):
        return spec, ()
    spec = dict(spec or {})
    unknown = sorted(set(spec) - {"mode", "input_size", "mean", "std"})
    if unknown:
        raise InvalidValueError(f"preprocess: unknown key(s) {', '.join(unknown)}; known: mode, input_size, mean, std")
    defaulted = [k for k in ("mode", "input_size") if k not in spec]
    mode = str(spec.get("mode", "letterbox"))
    if mode == "resize":
        defaulted += [k for k in ("mean", "std") if k not in spec]
    raw_size = spec.get("input_size", DEFAULT_INPUT_SIZE)
    if isinstance(raw_size, int) and not isinstance(raw_size, bool):
        raw_size = (raw_size, raw_size)
    if not isinstance(raw_size, list | tuple):
        raise InvalidValueError(f"preprocess input_size: expected [H, W], got {raw_size!r}")
    size = tuple(raw_size)
    if len(size) == 3:  # (C, H, W) as an input spec gives it
        size = size[1:]
    kwargs: dict[str, object] = {"mode": mode, "input_size": size}
    for key in ("mean", "std"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list | tuple):
                raise InvalidValueError(f"preprocess {key}: expected 3 numbers, got {value!r}")
            kwargs[key] = tuple(float(v) for v in value)
    return DetectionPreprocess(**kwargs), tuple(defaulted)  # type: ignore[arg-type]


def letterbox_geometry(width: int, height: int, input_size: tuple[int, int]) -> tuple[tuple[int, int], ImageTransform]:
    """The resized size ``(new_w, new_h)`` and the transform of ultralytics' centred letterbox.

    Example:
        >>> size, t = letterbox_geometry(500, 375, (640, 640))
        >>> size, t.scale_x, t.pad_x, t.pad_y
        ((640, 480), 1.28, 0.0, 80.0)
    """
    out_h, out_w = input_size
    r = min(out_h / height, out_w / width)
    new_w, new_h = round(width * r), round(height * r)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    return (new_w, new_h), ImageTransform(
        scale_x=r, scale_y=r, pad_x=float(left), pad_y=float(top), width=width, height=height
    )


def preprocess_detection_image(image: Image.Image, config: DetectionPreprocess) -> tuple[torch.Tensor, ImageTransform]:
    """Turn one decoded image into a float32 ``[3, H, W]`` input and its map back.

    Args:
        image: A Pillow image of any mode (converted to RGB; alpha dropped).
        config: The preprocessing.

    Returns:
        ``(input, transform)``.
    """
    import numpy as np
    import torch
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    image = image.convert("RGB")
    width, height = image.size
    out_h, out_w = config.input_size
    if config.mode == "letterbox":
        (new_w, new_h), transform = letterbox_geometry(width, height, config.input_size)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        canvas = np.full((out_h, out_w, 3), PAD_VALUE, dtype=np.uint8)
        left, top = int(transform.pad_x), int(transform.pad_y)
        # ultralytics pads (left, right) = round(dw -/+ 0.1): the image always fits in between.
        canvas[top : top + new_h, left : left + new_w] = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(canvas.transpose(2, 0, 1).copy()).to(torch.float32).div_(255.0)
        return x, transform
    if (out_w, out_h) != (width, height):
        image = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(torch.float32).div_(255.0)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    transform = ImageTransform(
        scale_x=out_w / width, scale_y=out_h / height, pad_x=0.0, pad_y=0.0, width=width, height=height
    )
    return x.sub_(mean).div_(std), transform
