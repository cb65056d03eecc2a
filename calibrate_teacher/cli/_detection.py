"""The detection side of ``evaluate``, ``fit``, ``bake`` and ``export-soft-labels``.

Each command branches here once, at the top of its body, when :func:`routes` says the teacher is
a detector; each handler refuses the flags that have no meaning for detectors (exit 2), calls one
library job and renders what it returns. Numbers, files and formats stay in the library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from calibrate_teacher.cli._console import note, out, print_json

if TYPE_CHECKING:
    from collections.abc import Mapping

    from calibrate_teacher.cli._detection_options import DetectionArgs
    from calibrate_teacher.jobs._detection_inputs import DetectionOptions
    from calibrate_teacher.specs import DataSpec, TeacherSpec

#: The detection jobs' own defaults, used where the command's flag was not given.
_DEFAULT_BINS = 20
_DEFAULT_BOUNDS = (0.1, 10.0)
_DEFAULT_GRID = 32
_DEFAULT_SHARD_IMAGES = 1024
#: fit --objective for detectors: ece is D-ECE.
_OBJECTIVES = {"ece": "dece", "nll": "nll"}


def routes(teacher_spec: TeacherSpec | None, data_spec: DataSpec | None, detection: DetectionArgs | None) -> bool:
    """True when the command should run as a detection job (COCO data, a detection ONNX, detector flags)."""
    from calibrate_teacher.jobs._route import task_of

    if detection is not None and detection.names_a_detector:
        return True
    return task_of(teacher_spec, data_spec) == "detection"


def _given(name: str) -> bool:
    """Whether the command-line flag of parameter ``name`` was typed (not its default)."""
    # Recent Typer runs on its own copy of click: ask its context, not the click package's.
    try:
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:  # a Typer that uses click itself
        from click.core import ParameterSource  # type: ignore[assignment]
        from click.globals import get_current_context  # type: ignore[no-redef]

    ctx = get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)
    return source is not None and source is not ParameterSource.DEFAULT


def _refuse(**flags: object) -> None:
    """Exit 2 naming a classification-only flag that was given."""
    for flag, value in flags.items():
        if value not in (None, False):
            name = "--" + flag.replace("_", "-")
            raise typer.BadParameter(f"{name} does not apply to detection teachers (COCO data)", param_hint=name)


def _options(detection: DetectionArgs) -> DetectionOptions:
    from calibrate_teacher.jobs._detection_inputs import DetectionOptions

    return DetectionOptions(
        images=detection.images, head=detection.detection_head, background=detection.background,
        boxes_output=detection.boxes_output, scores_output=detection.scores_output,
        class_layer=detection.class_layer,
    )  # fmt: skip


def _point(detection: DetectionArgs) -> dict[str, object] | None:
    values: dict[str, object] = {
        "score_threshold": detection.score_threshold,
        "max_detections": detection.max_detections,
        "nms_iou": detection.nms_iou,
        "match_iou": detection.match_iou,
    }
    given = {k: v for k, v in values.items() if v is not None}
    return given or None


def _needs(teacher_spec: TeacherSpec | None, data_spec: DataSpec | None) -> tuple[TeacherSpec, DataSpec]:
    if teacher_spec is None:
        raise typer.BadParameter("detection needs the TEACHER model (its COCO --data is given)", param_hint="TEACHER")
    if data_spec is None:
        raise typer.BadParameter(
            "detection needs --data annotations.json (with --images DIR) or a COCO folder", param_hint="--data"
        )
    return teacher_spec, data_spec


def _notes(lines: tuple[str, ...] | list[str]) -> None:
    for line in lines:
        note(line)


def _preprocessing(data: Mapping[str, object]) -> None:
    if data.get("preprocess_from"):
        note(f"preprocessing: {data.get('preprocess')} from {data['preprocess_from']}")


def _write_report(document: dict[str, object], report: Path | None, overwrite: bool) -> None:
    if report is not None:
        from calibrate_teacher.report import write_json

        write_json(document, report, overwrite=overwrite)
        note(f"report written to {report}")


def _precheck(report: Path | None, overwrite: bool) -> None:
    from calibrate_teacher._io import check_output

    if report is not None:
        check_output(report, overwrite=overwrite)


def evaluate(
    *,
    teacher_spec: TeacherSpec | None,
    data_spec: DataSpec | None,
    detection: DetectionArgs,
    logits: Path | None,
    temperature: float,
    n_bins: int,
    json_output: bool,
    report: Path | None,
    diagram: Path | None,
    save_logits: Path | None,
    overwrite: bool,
) -> None:
    """``evaluate`` for a detection teacher: D-ECE, counts and mAP at one temperature."""
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.jobs import evaluate_detector

    _refuse(logits=logits, diagram=diagram, save_logits=save_logits)
    teacher, data = _needs(teacher_spec, data_spec)
    _precheck(report, overwrite)
    with progress_bar("teacher", unit="images") as advance:
        run = evaluate_detector(
            teacher, data, options=_options(detection), temperature=temperature, operating_point=_point(detection),
            matching=detection.matching, n_bins=n_bins if _given("n_bins") else _DEFAULT_BINS, progress=advance,
        )  # fmt: skip
    _notes(run.notes)
    _preprocessing(run.data)
    document = run.to_json()
    _write_report(document, report, overwrite)
    if json_output:
        print_json(document)
        return
    out.print(run.table())


def fit(
    *,
    teacher_spec: TeacherSpec | None,
    data_spec: DataSpec | None,
    detection: DetectionArgs,
    logits: Path | None,
    objective: str,
    temperature: float | None,
    bounds: tuple[float, float],
    grid: int,
    n_bins: int,
    out_path: Path | None,
    no_bake: bool,
    json_output: bool,
    report: Path | None,
    diagram: Path | None,
    save_logits: Path | None,
    overwrite: bool,
) -> None:
    """``fit`` for a detection teacher: T on the class logits, D-ECE and mAP before/after, the baked detector."""
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.jobs import calibrate_detector

    _refuse(logits=logits, diagram=diagram, save_logits=save_logits)
    if temperature is None and objective not in _OBJECTIVES:
        raise typer.BadParameter(
            f"{objective!r}: detection teachers fit ece (D-ECE, the default) or nll, or take --temperature T",
            param_hint="--objective",
        )
    if out_path is not None and no_bake:
        raise typer.BadParameter("--out names the baked detector; it cannot go with --no-bake", param_hint="--out")
    teacher, data = _needs(teacher_spec, data_spec)
    _precheck(report, overwrite)
    with progress_bar("teacher", unit="images") as advance:
        run = calibrate_detector(
            teacher, data, options=_options(detection),
            objective="fixed" if temperature is not None else _OBJECTIVES[objective],  # type: ignore[arg-type]
            temperature=temperature, operating_point=_point(detection), matching=detection.matching,
            bounds=bounds if _given("bounds") else _DEFAULT_BOUNDS, grid=grid if _given("grid") else _DEFAULT_GRID,
            n_bins=n_bins if _given("n_bins") else _DEFAULT_BINS, bake=not no_bake, out=out_path,
            overwrite=overwrite, progress=advance,
        )  # fmt: skip
    _notes(run.notes)
    _preprocessing(run.data)
    document = run.to_json()
    _write_report(document, report, overwrite)
    if run.baked is not None:
        note(f"baked detector written to {run.baked.path} (class logits / {run.fit.temperature:.4f}, boxes unchanged)")
    if json_output:
        print_json(document)
        return
    for item in (run.table(), run.sweep_table(), run.summary()):
        out.print(item)


def bake(
    *,
    teacher: Path,
    teacher_spec: TeacherSpec | None,
    detection: DetectionArgs,
    temperature: float,
    out_path: Path | None,
    overwrite: bool,
    json_output: bool,
) -> None:
    """``bake`` for a detector: T into its class-logit layer only (ONNX Div, or the state dict's layer)."""
    from rich.markup import escape

    from calibrate_teacher.cli._console import err
    from calibrate_teacher.detection.bake import bake_detector_temperature

    assert teacher_spec is not None
    spec = teacher_spec
    _refuse(output=spec.output, input=spec.inputs, trust_remote_code=spec.trust_remote_code)
    layer = detection.class_layer
    if spec.head is not None and layer is not None and spec.head != layer:
        raise typer.BadParameter("--head and --class-layer name two layers; give one", param_hint="--class-layer")
    with err.status(f"baking T = {temperature:g} into the class logits of {escape(teacher.name)}", spinner="dots"):
        result = bake_detector_temperature(
            teacher, temperature, out=out_path, overwrite=overwrite, arch=spec.arch, arch_kwargs=spec.arch_kwargs,
            head=detection.detection_head, background=detection.background, boxes_output=detection.boxes_output,
            scores_output=detection.scores_output, class_layer=layer or spec.head, device=spec.device,
        )  # fmt: skip
    _notes(result.notes)
    if json_output:
        print_json(result.to_json())
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Baked detector", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("written", str(result.path)),
        *(("data file", str(p)) for p in result.extra_files),
        ("format", result.format),
        ("temperature", f"{result.temperature:g}"),
        ("divided by T", ", ".join(result.changed)),
        ("boxes", "bit-identical on the probe"),
        ("max |baked - original/T|", f"{result.max_abs_error:.2e} (tol {result.tolerance:.1e})"),
        ("probe batch", str(list(result.probe_shape))),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))
    out.print(table)


def export_soft_labels(
    *,
    teacher_spec: TeacherSpec | None,
    data_spec: DataSpec | None,
    detection: DetectionArgs,
    out_dir: Path,
    temperature: float | None,
    from_report: Path | None,
    top_k: int | None,
    shard_rows: int,
    overwrite: bool,
    json_output: bool,
) -> None:
    """``export-soft-labels`` for a dense detector: each image's top candidates with z / T, keyed by image id."""
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.jobs import export_detector_soft_labels

    if (temperature is None) == (from_report is None):
        raise typer.BadParameter("give exactly one of --temperature T or --from-report FILE")
    if _given("resume"):
        raise typer.BadParameter("a detection cache is written whole (no resume)", param_hint="--resume")
    teacher, data = _needs(teacher_spec, data_spec)
    t = temperature if temperature is not None else _report_temperature(from_report)
    with progress_bar("soft labels", unit="images") as advance:
        run = export_detector_soft_labels(
            teacher, data, out_dir, temperature=t, options=_options(detection), top_candidates=detection.top_candidates,
            top_k=top_k or None, shard_images=shard_rows if _given("shard_rows") else _DEFAULT_SHARD_IMAGES,
            overwrite=overwrite, progress=advance,
        )  # fmt: skip
    _notes(run.notes)
    _preprocessing(run.data)
    if json_output:
        print_json(run.to_json())
        return
    from rich.table import Table
    from rich.text import Text

    info = run.cache
    table = Table(title="Detection soft-label cache", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("folder", str(info.path)),
        ("images", str(info.num_images)),
        ("candidates", f"{info.num_candidates} (at most {info.top_candidates} per image)"),
        ("temperature", f"{info.temperature:g} (stored: class logits / T)"),
        ("layout", info.layout),
        ("shards", str(info.shards)),
    ):
        table.add_row(key, Text(value))
    out.print(table)
    note(f"soft labels written to {info.path}; read them with calibrate_teacher.detection.open_detection_cache")


def _report_temperature(path: Path | None) -> float:
    from calibrate_teacher.soft_labels import Calibration

    assert path is not None
    calibration = Calibration.from_report(path)
    return calibration.temperature
