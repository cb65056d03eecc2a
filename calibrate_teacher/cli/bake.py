"""``calibrate-teacher bake``: write a copy of a teacher whose outputs are logits / T."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.cli import _detection
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli._console import err, note, out, print_json
from calibrate_teacher.cli._detection_options import DetectionArgs, detection_group
from calibrate_teacher.cli._specs import teacher_group, with_options
from calibrate_teacher.specs import TeacherSpec

TemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature",
        "-t",
        help="The temperature T to bake in (finite, > 0; the paper's default is 1.5).",
    ),
]


@with_options(teacher_group(head=True), detection_group(images=False, operating_point=False))
def bake(
    teacher: Annotated[
        Path,
        typer.Argument(
            help="Teacher model: .onnx, TorchScript .pt/.pth, .safetensors (with --arch), .pt2, or a Hugging Face "
            "model directory.",
        ),
    ],
    temperature: TemperatureOpt,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The baked teacher (default: <stem>.calibrated<suffix> beside "
            "TEACHER, same suffix; a Hugging Face directory: <dir>-calibrated).",
        ),
    ] = None,
    overwrite: o.OverwriteOpt = False,
    json_output: o.JsonOpt = False,
    teacher_spec: TeacherSpec | None = None,
    detection: DetectionArgs | None = None,
) -> None:
    """Bake a temperature into TEACHER: the same format, with outputs = logits / T.

    ONNX: a Div by T on the logits, before any final softmax (names, opset and
    dynamic axes kept; external data copied). TorchScript: a scripted wrapper.
    torch.export: re-exported with the Div. safetensors (+ --arch): W/T and b/T
    in the final Linear, T and the head recorded in the metadata. A Hugging Face
    directory: 1/T folded into its classifier, written with save_pretrained into
    <dir>-calibrated with the tokenizer and other files copied, T in config.json.

    The baked file is checked on a probe batch (max |baked - original/T| within
    1e-5 relative for float32) before it is moved into place. A KD trainer that
    also divides by its own tau then sees the teacher at tau * T.

    Examples:
      calibrate-teacher bake teacher.onnx --temperature 1.5
      calibrate-teacher bake teacher.onnx -t 2.1 --out teacher.t21.onnx --json
      calibrate-teacher bake weights.safetensors -t 1.5 --arch models.py:resnet18
      calibrate-teacher bake model.pt2 -t 1.8 --out calibrated.pt2 --overwrite
      calibrate-teacher bake ./bert-teacher -t 1.5
      calibrate-teacher bake yolov8n.onnx -t 1.8
      calibrate-teacher bake faster_rcnn.safetensors -t 1.6 --arch my_teacher.py:teacher --detection-head softmax
    """
    if _detection.routes(teacher_spec, None, detection):  # a detector: T on its class logits only
        assert detection is not None
        return _detection.bake(
            teacher=teacher, teacher_spec=teacher_spec, detection=detection, temperature=temperature,
            out_path=out_path, overwrite=overwrite, json_output=json_output,
        )  # fmt: skip
    from rich.markup import escape

    from calibrate_teacher.baking import bake_temperature, default_baked_path

    assert teacher_spec is not None
    target = out_path if out_path is not None else default_baked_path(teacher)
    spec = teacher_spec
    with err.status(f"baking T = {temperature:g} into {escape(teacher.name)}", spinner="dots"):
        result = bake_temperature(
            teacher, temperature, target, overwrite=overwrite, device=spec.device,
            output=None if spec.output is None else str(spec.output), arch=spec.arch,
            arch_kwargs=spec.arch_kwargs, head=spec.head, input_map=spec.inputs,
            trust_remote_code=spec.trust_remote_code,
        )
    for line in result.notes:
        note(line)
    if json_output:
        print_json(result.to_json())
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Baked teacher", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("written", str(result.path)),
        *(("data file", str(p)) for p in result.extra_files),
        ("format", result.format),
        ("temperature", f"{result.temperature:g}"),
        ("applied at", result.head or "model output"),
        ("max |baked - original/T|", f"{result.max_abs_error:.2e} (tol {result.tolerance:.1e})"),
        ("probe batch", str(list(result.probe_shape))),
    ]
    if result.checked_probabilities:
        rows.append(("softmax", "the model ends in a softmax; its probabilities were checked too"))
    for key, value in rows:
        table.add_row(key, Text(value))
    out.print(table)
