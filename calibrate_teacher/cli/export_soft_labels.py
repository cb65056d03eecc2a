"""``calibrate-teacher export-soft-labels``: the calibrated teacher's soft labels, as a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibrate_teacher.cli import _data_options as do
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli import _teacher_options as to
from calibrate_teacher.cli._console import note, out, print_json
from calibrate_teacher.soft_labels.writer import DEFAULT_SHARD_ROWS


def export_soft_labels(
    teacher: Annotated[
        Path,
        typer.Argument(
            help="Teacher model (.onnx, TorchScript .pt, .safetensors with --arch, .pt2).",
            dir_okay=False,
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Training data: an image folder (train/<class>/<image>) or an "
            ".npz/.safetensors/.npy file with 'inputs' and 'labels'.",
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
    batch_size: o.BatchSizeOpt = 64,
    workers: o.WorkersOpt = 0,
    overwrite: o.OverwriteOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue an interrupted export into --out (--no-resume: start it over).",
        ),
    ] = True,
    device: o.DeviceOpt = "auto",
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
    json_output: o.JsonOpt = False,
) -> None:
    """Run TEACHER over --data once and store its calibrated soft labels (logits / T) in --out.

    Any KD trainer can then read them with calibrate_teacher.SoftLabelCache / SoftLabelDataset
    instead of running the teacher. T comes from --temperature or from the report of `fit`
    (--from-report); the manifest keeps it. Trainers that divide teacher and student by their
    own KD tau see the teacher at tau * T. An interrupted export resumes when rerun. Under
    torchrun every rank writes its own shards; the manifest is written once all are done.

    Examples:
      calibrate-teacher export-soft-labels teacher.onnx --data train/ --out cache/ -t 1.5
      calibrate-teacher export-soft-labels teacher.onnx --data train/ --out cache/ \
          --from-report fit.json
      calibrate-teacher export-soft-labels teacher.pt --data train.npz --out cache/ -t 2 --top-k 10
      torchrun --nproc-per-node 4 -m calibrate_teacher export-soft-labels teacher.onnx \
          --data train/ --out cache/ -t 1.5
    """
    from calibrate_teacher._distributed import distributed_context
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.cli.inspect_cache import cache_table
    from calibrate_teacher.soft_labels import Calibration, describe_cache, export_soft_labels

    if (temperature is None) == (from_report is None):
        raise typer.BadParameter("give exactly one of --temperature T or --from-report FILE")
    if from_report is not None:
        calibration = Calibration.from_report(from_report)
    else:
        assert temperature is not None
        calibration = Calibration(temperature)
    overrides = do.preprocess_overrides(
        input_size=input_size, mean=mean, std=std, interpolation=interpolation,
        crop_pct=crop_pct, crop_mode=crop_mode,
    )
    main_rank = distributed_context().is_main
    with progress_bar("soft labels", unit="rows") as advance:
        manifest = export_soft_labels(
            teacher, data, out_dir, temperature=calibration, top_k=top_k, batch_size=batch_size,
            workers=workers, shard_rows=shard_rows, overwrite=overwrite, resume=resume,
            device=device, output=output, arch=arch, arch_kwargs=arch_kwargs,
            preprocess=preprocess, preprocess_overrides=overrides or None, classes=classes,
            progress=advance if main_rank else None,
        )
    if not main_rank:  # rank 0 speaks for the run
        return
    if json_output:
        print_json({"cache": str(out_dir), "manifest": manifest.to_json()})
        return
    out.print(cache_table(describe_cache(out_dir)))
    note(f"soft labels written to {out_dir} (values = logits / {manifest.temperature:g})")
