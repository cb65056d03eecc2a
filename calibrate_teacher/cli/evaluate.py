"""``calibrate-teacher evaluate``: measure a teacher's calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.cli import _data_options as do
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli import _teacher_options as to
from calibrate_teacher.cli._common import collect_source, precheck_outputs, render_or_json, write_outputs

TeacherArg = Annotated[
    Path | None,
    typer.Argument(help="Teacher model (.onnx, TorchScript .pt, .safetensors with --arch, .pt2); needed with --data."),
]


def evaluate(
    teacher: TeacherArg = None,
    logits: do.LogitsOpt = None,
    data: do.DataOpt = None,
    labels: o.LogitsLabelsOpt = None,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="Measure softmax(logits / T).")
    ] = 1.0,
    n_bins: o.NBinsOpt = 15,
    bootstrap: o.BootstrapOpt = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    json_output: o.JsonOpt = False,
    report: o.ReportOpt = None,
    diagram: Annotated[
        Path | None,
        typer.Option("--diagram", help="Save a reliability diagram (PNG; needs matplotlib).", dir_okay=False),
    ] = None,
    save_logits: do.SaveLogitsOpt = None,
    overwrite: o.OverwriteOpt = False,
    device: o.DeviceOpt = "auto",
    batch_size: o.BatchSizeOpt = 64,
    workers: o.WorkersOpt = 0,
    output: to.OutputNameOpt = None,
    arch: to.ArchOpt = None,
    arch_kwargs: to.ArchKwargsOpt = None,
    preprocess: do.PreprocessOpt = None,
    input_size: do.InputSizeOpt = None,
    mean: do.MeanOpt = None,
    std: do.StdOpt = None,
    interpolation: do.InterpolationOpt = None,
    crop_pct: do.CropPctOpt = None,
    crop_mode: do.CropModeOpt = None,
    classes: do.ClassesOpt = None,
    skip_bad: do.SkipBadOpt = False,
) -> None:
    """Measure a teacher's calibration: accuracy, NLL, Brier, ECE (over/under), MCE, AdaECE, ACE, TACE, classwise ECE.

    Reads precomputed logits (--logits), or runs TEACHER over --data. Bins are equal-width
    (lo, hi] with 0 in the first (ECE, MCE, classwise ECE) or equal-mass (AdaECE, ACE, TACE);
    --json prints every definition. Intervals are 95% bootstrap percentiles.

    Examples:
      calibrate-teacher evaluate --logits val.safetensors
      calibrate-teacher evaluate --logits val.safetensors --n-bins 20 --json
      calibrate-teacher evaluate examples/digits/teacher.onnx --data examples/digits/val --diagram rel.png
    """
    from calibrate_teacher.pipeline import evaluate as run_evaluate
    from calibrate_teacher.report import evaluation_document, metrics_table, reliability_text

    overrides = do.preprocess_overrides(
        input_size=input_size, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode
    )
    if teacher is not None and logits is not None:
        raise typer.BadParameter("give TEACHER with --data, or --logits alone (the teacher is not run on --logits)")
    precheck_outputs(report, save_logits, overwrite=overwrite, diagram=diagram)
    source = collect_source(
        teacher=teacher, logits=logits, labels=labels, data=data, device=device, output=output, arch=arch,
        arch_kwargs=arch_kwargs, preprocess=preprocess, overrides=overrides, classes=classes, skip_bad=skip_bad,
        batch_size=batch_size, workers=workers, save_logits=save_logits, overwrite=overwrite,
    )
    result = run_evaluate(source, temperature=temperature, n_bins=n_bins, bootstrap=bootstrap, seed=seed)
    document = evaluation_document(result.metrics, source=source.description)
    write_outputs(document, report=report, diagram=diagram, before=result.metrics, after=None, overwrite=overwrite)
    render_or_json(document, json_output, [metrics_table(result.metrics), reliability_text(result.metrics)])
