"""``export_soft_labels``: run a teacher over a data source and write its calibrated soft labels.

A thin layer over :func:`~calibrate_teacher.soft_labels.writer.write_soft_labels`: it loads the
teacher and the data, records what they are (teacher file and SHA-256, the data source's
description), and under ``torchrun`` joins the process group so that every rank writes its own
shards on its own device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from calibrate_teacher.soft_labels._format import CacheManifest, Calibration
from calibrate_teacher.soft_labels.writer import (
    DEFAULT_SHARD_ROWS,
    refuse_complete_cache,
    write_soft_labels,
)

__all__ = ["export_soft_labels"]

PathLike = str | os.PathLike[str]


def export_soft_labels(
    teacher: PathLike,
    data: PathLike,
    out: PathLike,
    *,
    temperature: float | Calibration,
    top_k: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    overwrite: bool = False,
    resume: bool = True,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    preprocess: PathLike | None = None,
    preprocess_overrides: Mapping[str, object] | None = None,
    classes: Sequence[str] | PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheManifest:
    """Run ``teacher`` over ``data`` and write the soft labels ``logits / T`` to the folder ``out``.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each rank runs the teacher on its own device
    (``cuda:LOCAL_RANK`` for ``auto``/``cuda``) and writes its own shards; rank 0 writes the
    manifest once all are done. Without torchrun it is one process. A rerun of an interrupted
    export resumes from its finished shards.

    Args:
        teacher: The teacher model (.onnx, TorchScript, .safetensors with ``arch``, .pt2).
        data: An image folder or an array file (see :func:`calibrate_teacher.data.open_data`).
        out: The cache folder.
        temperature: T (e.g. ``1.5``), or a :class:`Calibration` such as
            ``Calibration.from_report("fit-report.json")``.
        top_k: None: dense when C <= 1000, else the top 10; 0: dense; K: the top K per row.
        batch_size: Samples per teacher call (keep it fixed across resumes for identical bytes).
        workers: Data-loading worker processes.
        shard_rows: Rows per shard.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished export into ``out`` (False: start it over).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        output: The teacher output holding the logits, when it has several.
        arch: ``pkg.module:factory`` (or ``file.py:factory``) for safetensors weights.
        arch_kwargs: Keyword arguments for ``arch`` (a mapping or a JSON string).
        preprocess: Image folders: a preprocess JSON (default: the sidecar beside the teacher).
        preprocess_overrides: Image folders: single preprocessing keys that win.
        classes: Class names in label order, or a file of them.
        progress: Called with (rows just computed, rows this rank has to do) after each batch.

    Returns:
        The complete manifest.

    Raises:
        OutputExistsError: ``out`` holds a complete cache and ``overwrite`` is false.
        CacheError: ``out`` holds an unfinished cache of another teacher, data, T or layout.
        InputError: unreadable teacher or data files.
        TeacherError: the teacher fails to load or returns bad logits.
        InvalidValueError: bad options (T, top_k, shard_rows).
    """
    from calibrate_teacher._device import resolve_device
    from calibrate_teacher._distributed import distributed_context, process_group, rank_device
    from calibrate_teacher._io import sha256_file
    from calibrate_teacher.collect import LogitBatch, iter_logits
    from calibrate_teacher.data import open_data
    from calibrate_teacher.teachers import load_teacher

    calibration = temperature if isinstance(temperature, Calibration) else Calibration(temperature)
    refuse_complete_cache(Path(out), overwrite=overwrite)  # before minutes of loading, not after
    rank_dev = resolve_device(rank_device(device, distributed_context()))
    with process_group(rank_dev) as context:
        model = load_teacher(
            teacher, device=rank_dev, output=output, arch=arch, arch_kwargs=arch_kwargs
        )
        source = open_data(
            data,
            preprocess=preprocess,
            overrides=preprocess_overrides,
            teacher=model,
            classes=classes,
        )
        teacher_info: dict[str, object] = {
            "file": Path(teacher).name,
            "sha256": sha256_file(teacher),
            "format": model.format,
        }
        if output is not None:
            teacher_info["output"] = output
        if arch is not None:
            teacher_info["arch"] = arch

        def produce(rows: Sequence[int]) -> Iterator[LogitBatch]:
            return iter_logits(model, source, batch_size=batch_size, workers=workers, indices=rows)

        return write_soft_labels(
            produce,
            out,
            num_samples=len(source),
            num_classes=model.num_classes,
            temperature=calibration,
            teacher=teacher_info,
            data=dict(getattr(source, "description", {"path": str(data)})),
            top_k=top_k,
            shard_rows=shard_rows,
            overwrite=overwrite,
            resume=resume,
            context=context,
            progress=progress,
        )
