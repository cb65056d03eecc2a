"""``calibrate-teacher fit``: find the teacher's temperature and bake it into a calibrated copy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.cli import _data_options as do
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli import _teacher_options as to
from calibrate_teacher.cli._common import collect_source, precheck_outputs, render_or_json, write_outputs
from calibrate_teacher.cli._console import note
from calibrate_teacher.cli.evaluate import TeacherArg


def fit(
    teacher: TeacherArg = None,
    logits: do.LogitsOpt = None,
    data: do.DataOpt = None,
    labels: o.LogitsLabelsOpt = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="What T minimises: ece (default; the paper ties the teacher's ECE to student accuracy), "
            "nll (exact), adaece, ace, or paper (ECE within the paper's robust 1.5-3.0: never sharpens "
            "the teacher). Ignored with --temperature.",
        ),
    ] = "ece",
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", "-t",
                     help="Use this T instead of searching (the paper's default is 1.5; robust in 1.5-3.0)."),
    ] = None,
    bounds: Annotated[
        tuple[float, float], typer.Option("--bounds", help="Search T within LOW HIGH.")
    ] = (0.05, 20.0),
    grid: Annotated[
        int, typer.Option("--grid", min=2, help="Temperatures in the sweep (log-spaced, plus 1 and 1.5).")
    ] = 64,
    n_bins: o.NBinsOpt = 15,
    bootstrap: o.BootstrapOpt = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where the baked teacher goes (default: <stem>.calibrated<suffix> beside TEACHER).",
                     dir_okay=False),
    ] = None,
    no_bake: Annotated[bool, typer.Option("--no-bake", help="Fit and report only; write no baked teacher.")] = False,
    json_output: o.JsonOpt = False,
    report: o.ReportOpt = None,
    diagram: Annotated[
        Path | None, typer.Option("--diagram", help="Save before/after reliability diagrams (PNG; needs matplotlib).",
                                  dir_okay=False)
    ] = None,
    save_logits: do.SaveLogitsOpt = None,
    overwrite: o.OverwriteOpt = False,
    device: o.DeviceOpt = "auto",
    batch_size: o.BatchSizeOpt = 64,
    workers: o.WorkersOpt = 0,
    output: to.OutputNameOpt = None,
    arch: to.ArchOpt = None,
    arch_kwargs: to.ArchKwargsOpt = None,
    head: to.HeadOpt = None,
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
    """Find the temperature T that calibrates the teacher, report before/after, and bake T into TEACHER.

    The logits come from --logits, or from running TEACHER over --data. With a TEACHER file,
    the baked teacher (outputs = logits / T, same format) is written beside it as
    <stem>.calibrated<suffix>, or to --out. Downstream KD trainers that divide teacher and
    student by their own tau then see the calibrated teacher at tau * T.

    Examples:
      calibrate-teacher fit examples/digits/teacher.onnx --data examples/digits/val
      calibrate-teacher fit --logits val.safetensors --objective nll --json
      calibrate-teacher fit teacher.onnx --logits val.safetensors --objective paper
      calibrate-teacher fit teacher.onnx --logits val.safetensors --temperature 1.5 --out teacher.t15.onnx
      calibrate-teacher fit teacher.onnx --data val/ --save-logits val.safetensors --report fit.json
    """
    from calibrate_teacher.pipeline import calibrate
    from calibrate_teacher.report import fit_document, fit_summary, metrics_table, reliability_text, sweep_table
    from calibrate_teacher.temperature import OBJECTIVES

    if objective not in OBJECTIVES or objective == "fixed":
        raise typer.BadParameter(f"--objective must be one of nll, ece, adaece, ace, paper; got {objective!r}")
    if out is not None and teacher is None:
        raise typer.BadParameter("--out needs a TEACHER model to bake")
    overrides = do.preprocess_overrides(
        input_size=input_size, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode
    )
    bake = teacher is not None and not no_bake
    baked_path = None
    if bake and teacher is not None:
        from calibrate_teacher.baking import default_baked_path

        baked_path = out or default_baked_path(teacher)
    precheck_outputs(report, save_logits, baked_path, overwrite=overwrite, diagram=diagram)
    source = collect_source(
        teacher=teacher, logits=logits, labels=labels, data=data, device=device, output=output, arch=arch,
        arch_kwargs=arch_kwargs, preprocess=preprocess, overrides=overrides, classes=classes, skip_bad=skip_bad,
        batch_size=batch_size, workers=workers, save_logits=save_logits, overwrite=overwrite,
    )
    run = calibrate(
        teacher, logits=source, objective="fixed" if temperature is not None else objective,  # type: ignore[arg-type]
        temperature=temperature, bounds=bounds, n_bins=n_bins, grid=grid, bootstrap=bootstrap, seed=seed,
        out=baked_path, bake=bake, overwrite=overwrite, head=head, device=device, output=output, arch=arch,
        arch_kwargs=arch_kwargs,
    )
    document = fit_document(run.fit, source=source.description)
    if run.baked is not None:
        document["baked"] = run.baked.to_dict()
    write_outputs(document, report=report, diagram=diagram, before=run.fit.before, after=run.fit.after,
                  overwrite=overwrite)
    if run.baked is not None:
        note(f"baked teacher written to {run.baked.path} (outputs = logits / {run.fit.temperature:.4f})")
    render_or_json(
        document,
        json_output,
        [metrics_table(run.fit.before, run.fit.after), sweep_table(run.fit.sweep, run.fit.temperature),
         reliability_text(run.fit.after), fit_summary(run.fit)],
    )
