"""``calibrate-teacher evaluate``: measure a teacher's calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
from calibrate_teacher.cli._detection_options import DetectionArgs, detection_group
from calibrate_teacher.cli._specs import data_group, teacher_group, with_options
from calibrate_teacher.specs import DataSpec, TeacherSpec

TeacherArg = Annotated[
    Path | None,
    typer.Argument(
        help="Teacher model (.onnx, TorchScript .pt, .safetensors with --arch, .pt2, a Hugging Face model "
        "directory); needed with --data."
    ),
]


@with_options(teacher_group(head=False), data_group(), detection_group())
def evaluate(
    teacher: TeacherArg = None,
    logits: do.LogitsOpt = None,
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
    teacher_spec: TeacherSpec | None = None,
    data_spec: DataSpec | None = None,
    detection: DetectionArgs | None = None,
) -> None:
    """Measure a teacher's calibration: accuracy, NLL, Brier, ECE (over/under), MCE, AdaECE, ACE, TACE, classwise ECE.

    Reads precomputed logits (--logits), or runs TEACHER over --data. Bins are equal-width
    (lo, hi] with 0 in the first (ECE, MCE, classwise ECE) or equal-mass (AdaECE, ACE, TACE);
    --json prints every definition. Intervals are 95% bootstrap percentiles.

    Examples:
      calibrate-teacher evaluate --logits val.safetensors
      calibrate-teacher evaluate --logits val.safetensors --n-bins 20 --json
      calibrate-teacher evaluate examples/digits/teacher.onnx --data examples/digits/val --diagram rel.png
      calibrate-teacher evaluate examples/detection/detector.onnx --data examples/detection/coco
      calibrate-teacher evaluate examples/text/bert-teacher --data examples/text/val.jsonl
      calibrate-teacher evaluate examples/lm/tiny-llama --data examples/lm/val.jsonl --json
    """
    if _detection.routes(teacher_spec, data_spec, detection):  # COCO data or a detector: D-ECE and mAP
        assert detection is not None
        return _detection.evaluate(
            teacher_spec=teacher_spec, data_spec=data_spec, detection=detection, logits=logits,
            temperature=temperature, n_bins=n_bins, json_output=json_output, report=report, diagram=diagram,
            save_logits=save_logits, overwrite=overwrite,
        )  # fmt: skip
    from calibrate_teacher.jobs import evaluate as run_evaluate
    from calibrate_teacher.jobs._route import task_of
    from calibrate_teacher.report import evaluation_document, metrics_table, reliability_text

    if teacher is not None and logits is not None:
        raise typer.BadParameter("give TEACHER with --data, or --logits alone (the teacher is not run on --logits)")
    precheck_outputs(report, overwrite=overwrite, diagram=diagram)
    if teacher_spec is not None and data_spec is not None and task_of(teacher_spec, data_spec) == "tokens":
        if diagram is not None or save_logits is not None:
            raise typer.BadParameter("--diagram and --save-logits do not apply to token-level teachers")
        return _tokens.evaluate(  # a causal LM or token classifier: metrics over scored tokens
            teacher_spec, data_spec, temperature=temperature, n_bins=n_bins, json_output=json_output,
            report=report, overwrite=overwrite,
        )
    with teacher_progress(logits is None) as advance:
        result = run_evaluate(
            teacher_spec, data_spec, logits=logits, labels=labels, temperature=temperature, n_bins=n_bins,
            bootstrap=bootstrap, seed=seed, save_logits=save_logits, overwrite=overwrite, progress=advance,
        )
    print_notes(result.source)
    document = evaluation_document(result)
    write_outputs(document, report=report, diagram=diagram, before=result.metrics, after=None, overwrite=overwrite)
    render_or_json(document, json_output, [metrics_table(result.metrics), reliability_text(result.metrics)])
