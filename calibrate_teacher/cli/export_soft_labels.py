"""``calibrate-teacher export-soft-labels``: the calibrated teacher's soft labels, as a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.cli import _detection, _tokens
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli._console import note, out, print_json
from calibrate_teacher.cli._detection_options import DetectionArgs, detection_group
from calibrate_teacher.cli._specs import data_group, teacher_group, with_options
from calibrate_teacher.soft_labels.writer import DEFAULT_SHARD_ROWS
from calibrate_teacher.specs import DataSpec, TeacherSpec

TrainDataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Training data: an image folder (train/<class>/<image>), text rows (.jsonl, .csv, .parquet, a "
        "datasets save_to_disk folder), or an "
        ".npz/.safetensors/.npy file with 'inputs' and 'labels'.",
    ),
]


@with_options(
    teacher_group(head=False), data_group(data=TrainDataOpt, required=True, skip_bad=False),
    detection_group(operating_point=False, cache=True),
)
def export_soft_labels(
    teacher: Annotated[
        Path,
        typer.Argument(
            help="Teacher model (.onnx, TorchScript .pt, .safetensors with --arch, .pt2, a Hugging Face model "
            "directory).",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="The cache folder to write.", file_okay=False)
    ],
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", "-t", help="Calibration temperature T; the cache stores logits / T."
        ),
    ] = None,
    from_report: Annotated[
        Path | None,
        typer.Option(
            "--from-report",
            help="Take T (and its objective and metrics) from a `fit --report` JSON.",
            dir_okay=False,
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="Keep the K largest classes per row (+ the tail mass). 0: dense. "
            "Default: dense when C <= 1000, else 10.",
        ),
    ] = None,
    shard_rows: Annotated[
        int, typer.Option("--shard-rows", min=1, help="Rows per shard file.")
    ] = DEFAULT_SHARD_ROWS,
    overwrite: o.OverwriteOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue an interrupted export into --out (--no-resume: start it over).",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --from-report: use its T even though the report was fitted for another teacher.",
        ),
    ] = False,
    json_output: o.JsonOpt = False,
    teacher_spec: TeacherSpec | None = None,
    data_spec: DataSpec | None = None,
    detection: DetectionArgs | None = None,
) -> None:
    """Run TEACHER over --data once and store its calibrated soft labels (logits / T) in --out.

    Any KD trainer can then read them with calibrate_teacher.SoftLabelCache / SoftLabelDataset
    instead of running the teacher. T comes from --temperature or from the report of `fit`
    (--from-report); the manifest keeps it. Trainers that divide teacher and student by their
    own KD tau see the teacher at tau * T. An interrupted export resumes when rerun; rerunning a
    finished one changes nothing and exits 0. A second export into the same --out fails at
    once. Under torchrun every rank writes its own shards; the manifest is written once all
    are done.

    Examples:
      calibrate-teacher export-soft-labels teacher.onnx --data train/ --out cache/ -t 1.5
      calibrate-teacher export-soft-labels teacher.onnx --data train/ --out cache/ \
          --from-report fit.json
      calibrate-teacher export-soft-labels teacher.pt --data train.npz --out cache/ -t 2 --top-k 10
      calibrate-teacher export-soft-labels ./tiny-llama --data train.jsonl --out lm-cache/ -t 1.5 --top-k 64
      torchrun --nproc-per-node 4 -m calibrate_teacher export-soft-labels teacher.onnx \
          --data train/ --out cache/ -t 1.5
      calibrate-teacher export-soft-labels detector.onnx --data coco/annotations.json --images coco/images \
          --out det-cache/ --from-report fit.json
    """
    if _detection.routes(teacher_spec, data_spec, detection):  # COCO data: each image's top candidates, z / T
        assert detection is not None
        return _detection.export_soft_labels(
            teacher_spec=teacher_spec, data_spec=data_spec, detection=detection, out_dir=out_dir,
            temperature=temperature, from_report=from_report, top_k=top_k, shard_rows=shard_rows,
            overwrite=overwrite, json_output=json_output,
        )  # fmt: skip
    from calibrate_teacher._distributed import distributed_context
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.cli.inspect_cache import cache_table
    from calibrate_teacher.jobs import export_soft_labels
    from calibrate_teacher.jobs._route import task_of
    from calibrate_teacher.soft_labels import Calibration, describe_cache

    if (temperature is None) == (from_report is None):
        raise typer.BadParameter("give exactly one of --temperature T or --from-report FILE")
    if from_report is not None:
        calibration = Calibration.from_report(from_report)
    else:
        assert temperature is not None
        calibration = Calibration(temperature)
    assert teacher_spec is not None
    assert data_spec is not None
    if task_of(teacher_spec, data_spec) == "tokens":  # a causal LM / token classifier: a row per scored token
        return _tokens.export(
            teacher_spec, data_spec, out_dir, calibration=calibration, top_k=top_k,
            shard_rows=None if shard_rows == DEFAULT_SHARD_ROWS else shard_rows, overwrite=overwrite,
            resume=resume, json_output=json_output,
        )
    main_rank = distributed_context().is_main
    notes: list[str] = []

    def tell(line: str) -> None:
        notes.append(line)
        note(line)

    with progress_bar("soft labels", unit="rows") as advance:
        manifest = export_soft_labels(
            teacher_spec, data_spec, out_dir, temperature=calibration, top_k=top_k, shard_rows=shard_rows,
            overwrite=overwrite, resume=resume, force=force, progress=advance if main_rank else None,
            notify=tell if main_rank else None,
        )
    if not main_rank:  # rank 0 speaks for the run
        return
    if json_output:
        print_json({"cache": str(out_dir), "manifest": manifest.to_json()})
        return
    out.print(cache_table(describe_cache(out_dir)))
    if not any("nothing to do" in line for line in notes):
        note(f"soft labels written to {out_dir} (values = logits / {manifest.temperature:g})")
