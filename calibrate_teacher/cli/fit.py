"""``calibrate-teacher fit``: find the teacher's temperature and bake it into a calibrated copy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from calibrate_teacher.cli import _data_options as do
from calibrate_teacher.cli import _detection, _tokens
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli._common import (
    precheck_outputs,
    print_notes,
    render_or_json,
    teacher_progress,
    write_outputs,
)
from calibrate_teacher.cli._console import note
from calibrate_teacher.cli._detection_options import DetectionArgs, detection_group
from calibrate_teacher.cli._specs import data_group, teacher_group, with_options
from calibrate_teacher.cli.evaluate import TeacherArg
from calibrate_teacher.specs import DataSpec, TeacherSpec

#: The objectives --objective offers (``fixed`` is spelled --temperature T).
SearchObjective = Literal["ece", "nll", "adaece", "ace", "paper"]


@with_options(teacher_group(head=True), data_group(), detection_group())
def fit(
    teacher: TeacherArg = None,
    logits: do.LogitsOpt = None,
    labels: o.LogitsLabelsOpt = None,
    objective: Annotated[
        SearchObjective,
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
        typer.Option("--out", help="Where the baked teacher goes (default: <stem>.calibrated<suffix> beside TEACHER; "
                     "a Hugging Face directory: <dir>-calibrated)."),
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
    teacher_spec: TeacherSpec | None = None,
    data_spec: DataSpec | None = None,
    detection: DetectionArgs | None = None,
) -> None:
    """Find the temperature T that calibrates the teacher, report before/after, and bake T into TEACHER.

    The logits come from --logits, or from running TEACHER over --data. With a TEACHER file,
    the baked teacher (outputs = logits / T, same format) is written beside it as
    <stem>.calibrated<suffix>, or to --out. Downstream KD trainers that divide teacher and
    student by their own tau then see the calibrated teacher at tau * T.

    A Hugging Face directory is baked into <dir>-calibrated. A causal LM or token classifier
    is measured and fitted over its scored tokens (exact at any vocabulary size); a detector
    on COCO data over its matched detections (D-ECE, mAP before and after).

    Examples:
      calibrate-teacher fit examples/digits/teacher.onnx --data examples/digits/val
      calibrate-teacher fit --logits val.safetensors --objective nll --json
      calibrate-teacher fit teacher.onnx --logits val.safetensors --objective paper
      calibrate-teacher fit teacher.onnx --logits val.safetensors --temperature 1.5 --out teacher.t15.onnx
      calibrate-teacher fit teacher.onnx --data val/ --save-logits val.safetensors --report fit.json
      calibrate-teacher fit examples/detection/detector.onnx --data examples/detection/coco --score-threshold 0.3
      calibrate-teacher fit examples/text/bert-teacher --data examples/text/val.jsonl --text-field text --id-field id
      calibrate-teacher fit examples/lm/tiny-llama --data examples/lm/val.jsonl --objective nll
    """
    if _detection.routes(teacher_spec, data_spec, detection):  # COCO data or a detector: T on the class logits
        assert detection is not None
        return _detection.fit(
            teacher_spec=teacher_spec, data_spec=data_spec, detection=detection, logits=logits, objective=objective,
            temperature=temperature, bounds=bounds, grid=grid, n_bins=n_bins, out_path=out, no_bake=no_bake,
            json_output=json_output, report=report, diagram=diagram, save_logits=save_logits, overwrite=overwrite,
        )  # fmt: skip
    from calibrate_teacher.jobs import calibrate
    from calibrate_teacher.jobs._route import task_of
    from calibrate_teacher.report import fit_document, fit_summary, metrics_table, reliability_text, sweep_table

    if out is not None and teacher is None:
        raise typer.BadParameter("--out needs a TEACHER model to bake")
    precheck_outputs(report, overwrite=overwrite, diagram=diagram)
    if teacher_spec is not None and data_spec is not None and task_of(teacher_spec, data_spec) == "tokens":
        if diagram is not None or save_logits is not None:
            raise typer.BadParameter("--diagram and --save-logits do not apply to token-level teachers")
        return _tokens.fit(  # a causal LM or token classifier: T over scored tokens, exact at any vocabulary
            teacher_spec, data_spec, objective="fixed" if temperature is not None else objective,
            temperature=temperature, bounds=bounds, grid=grid, n_bins=n_bins, out=out, bake=not no_bake,
            json_output=json_output, report=report, overwrite=overwrite,
        )
    with teacher_progress(logits is None) as advance:
        run = calibrate(
            teacher_spec, data_spec, logits=logits, labels=labels,
            objective="fixed" if temperature is not None else objective, temperature=temperature, bounds=bounds,
            n_bins=n_bins, grid=grid, bootstrap=bootstrap, seed=seed, out=out, bake=not no_bake,
            save_logits=save_logits, overwrite=overwrite, progress=advance,
        )
    print_notes(run.source)
    document = fit_document(run)
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
