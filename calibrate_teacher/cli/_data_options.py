"""Options for running a teacher on data: where the data is and how it is preprocessed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.data.preprocess import CropMode, Interpolation

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Validation data to run TEACHER on: an image folder (val/<class>/<image>), text rows (.jsonl, .csv, "
        ".parquet, a datasets save_to_disk folder), or an "
        ".npz/.safetensors/.npy file with 'inputs' and 'labels'.",
    ),
]
LogitsOpt = Annotated[
    Path | None,
    typer.Option(
        "--logits",
        help="Precomputed logits (.safetensors with 'logits' and 'labels', .npz, .npy, .pt): "
        "no teacher run needed.",
        dir_okay=False,
    ),
]
SaveLogitsOpt = Annotated[
    Path | None,
    typer.Option("--save-logits",
                 help="Save the teacher's logits here (.safetensors, .npz or .pt) for later --logits runs.",
                 dir_okay=False),
]
PreprocessOpt = Annotated[
    Path | None,
    typer.Option(
        "--preprocess",
        help="Preprocessing as JSON with timm pretrained_cfg keys (input_size, interpolation, crop_pct, "
        "crop_mode, mean, std); its keys win over the model's. Default: <model>.preprocess.json or "
        "preprocess.json beside the model, then the model's own metadata (timm config.json, Hugging Face "
        "preprocessor_config.json, ONNX metadata), then defaults, with a warning naming the keys.",
        dir_okay=False,
    ),
]
InputSizeOpt = Annotated[
    str | None, typer.Option("--input-size", help="Override input_size as C,H,W (e.g. 3,224,224).")
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="Override the normalisation mean, e.g. 0.485,0.456,0.406.")
]
StdOpt = Annotated[
    str | None, typer.Option("--std", help="Override the normalisation std, e.g. 0.229,0.224,0.225.")
]
InterpolationOpt = Annotated[
    Interpolation | None, typer.Option("--interpolation", help="Override the resize interpolation.")
]
CropPctOpt = Annotated[
    float | None, typer.Option("--crop-pct", help="Override crop_pct (resize to size / crop_pct, then crop).")
]
CropModeOpt = Annotated[
    CropMode | None,
    typer.Option(
        "--crop-mode", help="Override crop_mode: center (keep the aspect ratio, crop) or squash (resize both sides)."
    ),
]
ClassesOpt = Annotated[
    Path | None,
    typer.Option("--classes", help="A text file with one class name per line, in label order.", dir_okay=False),
]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip unreadable images (listed in the report) instead of failing.")
]


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError as exc:
        raise typer.BadParameter(f"{flag} expects comma-separated numbers, got {text!r}") from exc


def preprocess_overrides(
    *,
    input_size: str | None,
    mean: str | None,
    std: str | None,
    interpolation: str | None,
    crop_pct: float | None,
    crop_mode: str | None,
) -> dict[str, object]:
    """The flags that were given, as timm pretrained_cfg keys."""
    overrides: dict[str, object] = {}
    if input_size is not None:
        size = _floats(input_size, "--input-size")
        if len(size) != 3 or any(s != int(s) or s <= 0 for s in size):
            raise typer.BadParameter(f"--input-size expects C,H,W as three positive integers, got {input_size!r}")
        overrides["input_size"] = tuple(int(s) for s in size)
    if mean is not None:
        overrides["mean"] = _floats(mean, "--mean")
    if std is not None:
        overrides["std"] = _floats(std, "--std")
    if interpolation is not None:
        overrides["interpolation"] = interpolation
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    if crop_mode is not None:
        overrides["crop_mode"] = crop_mode
    return overrides
