"""The image transform: timm's evaluation preprocessing with Pillow and torch (no torchvision).

Given a :class:`~calibrate_teacher.data.preprocess.PreprocessConfig`, an image is converted to
the channels of ``input_size`` (``L`` or ``RGB``), resized, centre-cropped, scaled to ``[0, 1]``
and normalised. The geometry reproduces timm's ``transforms_imagenet_eval`` on PIL images: for a
square target, torchvision's ``Resize(int)`` rule (short side to ``floor(size / crop_pct)``,
long side ``int(target * long / short)``); for a non-square target, timm's ``ResizeKeepRatio``
rule (both sides scaled by the smaller ratio and rounded); ``squash`` resizes both sides to their
targets; then torchvision's ``CenterCrop`` (offsets ``round((size - crop) / 2)``, zero padding
where the image is smaller than the crop).

High bit depth grayscale (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``, ``F``)
is scaled, never clipped to 8 bits: integer values ``v`` become ``v / 65535`` (Pillow reads
16-bit PNG, TIFF and PGM files as ``I;16`` or ``I``, with PGM rescaled to 65535), float values
are taken as already on ``[0, 1]`` (torchvision's ``ToTensor`` convention). The resize and crop
then run on Pillow ``F`` images with the same filter and box, so a 16-bit image gives the same
tensor as its 8-bit version to within 8-bit rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from calibrate_teacher.data.preprocess import PreprocessConfig

__all__ = ["preprocess_image", "resize_target"]

#: High bit depth modes -> the value that maps to 1.0 (None: float, taken as is and not clipped).
_HIGH_DEPTH: dict[str, float | None] = {
    "I;16": 65535.0,
    "I;16B": 65535.0,
    "I;16L": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,
    "F": None,
}

_RESAMPLE = {
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "box": "BOX",
    "hamming": "HAMMING",
    "lanczos": "LANCZOS",
}


def resize_target(width: int, height: int, config: PreprocessConfig) -> tuple[int, int]:
    """Return the ``(width, height)`` an image is resized to before the centre crop.

    Example:
        >>> from calibrate_teacher.data.preprocess import PreprocessConfig
        >>> resize_target(500, 375, PreprocessConfig(input_size=(3, 224, 224)))
        (341, 256)
    """
    _, out_h, out_w = config.input_size
    scale_h = math.floor(out_h / config.crop_pct)
    scale_w = math.floor(out_w / config.crop_pct)
    if config.crop_mode == "squash":
        return scale_w, scale_h
    if scale_h == scale_w:
        # torchvision Resize(int): the short side becomes the target, the long side truncates.
        if width <= height:
            return scale_w, int(scale_w * height / width)
        return int(scale_h * width / height), scale_h
    # timm ResizeKeepRatio(longest=0): scale by the smaller ratio, round each side.
    ratio = min(height / scale_h, width / scale_w)
    return round(width / ratio), round(height / ratio)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """Turn one decoded image into a normalised float32 tensor ``[C, H, W]``.

    Converts the mode to the channels of ``input_size`` (palette images with transparency go
    through RGBA first, so Pillow does not warn; high bit depth grayscale is scaled to
    ``[0, 1]`` floats and repeated over the channels), resizes, centre-crops, scales to
    ``[0, 1]`` and normalises.

    Args:
        image: A Pillow image of any mode.
        config: The preprocessing.

    Returns:
        A contiguous float32 tensor of shape ``config.input_size``.
    """
    import numpy as np
    import torch
    from PIL import Image

    channels, out_h, out_w = config.input_size
    high_depth = image.mode in _HIGH_DEPTH
    full_scale = _HIGH_DEPTH.get(image.mode)
    if high_depth:
        # convert("L"/"RGB") clips these modes at 255 (a 16-bit image turns black and white).
        values = np.asarray(image, dtype=np.float32)
        if full_scale is not None:
            values = np.clip(values, 0.0, full_scale) / np.float32(full_scale)
        image = Image.fromarray(values)  # mode "F": resized and cropped as floats
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert("L" if channels == 1 else "RGB")
    width, height = resize_target(image.width, image.height, config)
    if (width, height) != image.size:
        resample = getattr(Image.Resampling, _RESAMPLE[config.interpolation])
        image = image.resize((width, height), resample)
    left = round((width - out_w) / 2.0)
    top = round((height - out_h) / 2.0)
    if out_w > width:  # torchvision pads first, then crops at offset 0: same box
        left = -((out_w - width) // 2)
    if out_h > height:
        top = -((out_h - height) // 2)
    if (left, top, out_w, out_h) != (0, 0, width, height):
        image = image.crop((left, top, left + out_w, top + out_h))
    if high_depth:
        plane = np.asarray(image, dtype=np.float32)
        if full_scale is not None:  # as the 8-bit path clips filter overshoot at 255
            plane = np.clip(plane, 0.0, 1.0)
        x = torch.from_numpy(plane.copy()).unsqueeze(0).repeat(channels, 1, 1)
    else:
        pixels = np.asarray(image, dtype=np.uint8).reshape(out_h, out_w, channels)
        x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(torch.float32).div_(255.0)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(channels, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(channels, 1, 1)
    return x.sub_(mean).div_(std)
