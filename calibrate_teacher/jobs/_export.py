"""The ``export_soft_labels`` job: run a teacher over data and write its calibrated soft labels.

A thin layer over :func:`~calibrate_teacher.soft_labels.writer.write_soft_labels`: it loads the
teacher and the data, records what they are (teacher file and SHA-256, the data source's
description, its paths resolved), and under ``torchrun`` joins the process group so that every
rank writes its own shards on its own device. ``--out`` is claimed (checked, created, locked)
before the teacher loads, and a request that differs from the cache already there in what is
known before loading (teacher file, T, layout, data path) is refused at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._format import MANIFEST_NAME, CacheManifest, read_manifest
from calibrate_teacher.soft_labels._output import claim_output
from calibrate_teacher.soft_labels._state import normalise_source, refusal
from calibrate_teacher.soft_labels.writer import DEFAULT_SHARD_ROWS, choose_layout, plan_manifest, write_claimed
from calibrate_teacher.specs import DataSpec, TeacherSpec

__all__ = ["export_soft_labels"]

PathLike = str | os.PathLike[str]


def export_soft_labels(
    teacher: TeacherSpec | PathLike | object,
    data: DataSpec | PathLike | object,
    out: PathLike,
    *,
    temperature: float | Calibration,
    top_k: int | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    overwrite: bool = False,
    resume: bool = True,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Run ``teacher`` over ``data`` and write the soft labels ``logits / T`` to the folder ``out``.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each rank runs the teacher on its own device
    (``cuda:LOCAL_RANK`` for ``auto``/``cuda``) and writes its own shards; rank 0 writes the
    manifest once all are done. Without torchrun it is one process. A rerun of an interrupted
    export resumes from its finished shards; a rerun of a finished one returns its manifest and
    writes nothing. An export that fails before finishing a shard leaves ``out`` as it was.

    Args:
        teacher: A :class:`~calibrate_teacher.TeacherSpec`, a teacher file (.onnx,
            TorchScript, .safetensors with ``arch``, .pt2), or an in-memory ``nn.Module``.
        data: A :class:`~calibrate_teacher.DataSpec`, an image folder or array file, or an
            iterable of batches that can be read again in the same order (to resume).
            Keep ``batch_size`` fixed across resumes for identical bytes.
        out: The cache folder.
        temperature: T (e.g. ``1.5``), or a :class:`Calibration` such as
            ``Calibration.from_report("fit-report.json")``.
        top_k: None: dense when C <= 1000, else the top 10; 0: dense; K: the top K per row.
        shard_rows: Rows per shard.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished export into ``out`` (False: start it over).
        force: Use a T from a ``fit`` report made for another teacher anyway (with a warning).
        progress: Called with (rows just computed, rows this rank has to do) after each batch.
        notify: Called with one line for the user (e.g. "already complete; nothing to do").

    Returns:
        The complete manifest.

    Raises:
        OutputExistsError: ``out`` holds a complete cache of another request and ``overwrite``
            is false.
        CacheError: ``out`` holds an unfinished cache of another teacher, data, T or layout, or
            is being written by another export.
        InputError: unreadable teacher or data files; ``out`` is a file; ``temperature`` comes
            from a ``fit`` report of another teacher and ``force`` is false.
        OutputError: ``out`` cannot be created or written, or a write failed (e.g. no space).
        TeacherError: the teacher fails to load or returns bad logits.
        InvalidValueError: bad options (T, top_k, shard_rows).
    """
    from dataclasses import replace

    from calibrate_teacher._device import resolve_device
    from calibrate_teacher._distributed import distributed_context, process_group, rank_device
    from calibrate_teacher.collect import LogitBatch, iter_logits

    teacher_spec, data_spec = TeacherSpec.of(teacher), DataSpec.of(data)
    calibration = temperature if isinstance(temperature, Calibration) else Calibration(temperature)
    file = teacher_spec.path
    rank_dev = resolve_device(rank_device(teacher_spec.device, distributed_context()))
    with process_group(rank_dev) as context, claim_output(out, context=context) as claim:
        recorded = {k: v for k, v in {"output": teacher_spec.output, "arch": teacher_spec.arch}.items()
                    if v is not None}
        # hashed once, before loading: the early refusal compares it (loading names a missing file)
        teacher_sha = _fingerprint(teacher_spec)
        name = file.name if file is not None else type(teacher_spec.source).__name__
        if teacher_sha is not None and not overwrite and data_spec.path is not None:
            _refuse_before_loading(
                claim.folder, {"file": name, "sha256": teacher_sha, **recorded},
                data_spec.path, calibration.temperature, top_k, shard_rows, resume=resume,
            )
        model = (replace(teacher_spec, device=rank_dev) if file is not None else teacher_spec).load()
        source = data_spec.open(model, trust_remote_code=teacher_spec.trust_remote_code)
        teacher_info = {"file": name, "sha256": teacher_sha, "format": model.format, **recorded}
        description = dict(source.description)
        # A T fitted for another teacher (or for other preprocessing) is refused or flagged now,
        # before the long run: the cache would hold soft labels calibrated for someone else.
        preprocess = description.get("preprocess")
        warnings = calibration.check_teacher(teacher_info, force=force) + calibration.check_preprocess(
            preprocess if isinstance(preprocess, Mapping) else None
        )
        for line in warnings:
            if notify is not None and context.is_main:
                notify(line)
        manifest = plan_manifest(
            num_samples=len(source),
            num_classes=model.num_classes,
            temperature=calibration,
            teacher=teacher_info,
            # resolved, so that a resume or retry naming the same data another way matches
            data=cast("dict[str, object]", normalise_source(description)),
            top_k=top_k,
            shard_rows=shard_rows,
        )

        def produce(rows: Sequence[int]) -> Iterator[LogitBatch]:
            return iter_logits(
                model, source, batch_size=data_spec.batch_size, workers=data_spec.workers, indices=rows
            )

        return write_claimed(
            produce, claim, manifest, overwrite=overwrite, resume=resume, progress=progress, notify=notify
        )


def _fingerprint(spec: TeacherSpec) -> str | None:
    """The teacher file's (or model directory's) SHA-256, or for an ``nn.Module`` the SHA-256 of its state dict."""
    from calibrate_teacher._io import sha256_file

    if spec.path is not None:
        return sha256_file(spec.path) if spec.path.exists() else None  # a model directory too
    state = getattr(spec.source, "state_dict", None)
    if not callable(state):
        raise InvalidValueError(
            f"teacher {type(spec.source).__name__}: a soft-label cache records its teacher's "
            "fingerprint, so export needs a model file or a torch.nn.Module"
        )
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(state().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _refuse_before_loading(
    folder: Path,
    teacher: Mapping[str, object],
    data: PathLike,
    temperature: float,
    top_k: int | None,
    shard_rows: int,
    *,
    resume: bool,
) -> None:
    """Refuse at once what the writer would refuse after loading: a different teacher, T, layout, data.

    Only what is known before the teacher and data load is compared; the writer compares the
    rest (format, preprocessing, N...) once they have.
    """
    if not (folder / MANIFEST_NAME).is_file():
        return
    old = read_manifest(folder)
    if not old.complete and not resume:
        return
    try:
        layout_differs = choose_layout(old.num_classes, top_k, shard_rows) != old.layout
    except InvalidValueError:
        layout_differs = True
    old_source = normalise_source(old.data.get("source"))
    old_path = old_source.get("path") if isinstance(old_source, dict) else None
    new_path = str(Path(data).resolve())
    keys = ("file", "sha256", "output", "arch")
    if any(old.teacher.get(k) != teacher.get(k) for k in keys):
        what = f"teacher (sha256 {old.teacher.get('sha256')!s:.12} vs {teacher.get('sha256')!s:.12})"
    elif old.temperature != temperature:
        what = f"temperature (T = {old.temperature} vs {temperature})"
    elif layout_differs:
        what = (
            f"layout (shard_rows {old.layout.shard_rows}, k {old.layout.k} vs "
            f"--shard-rows {shard_rows}, --top-k {top_k})"
        )
    elif old_path is not None and old_path != new_path:
        what = f"data source (path: {old_path!r:.60} vs {new_path!r:.60})"
    else:
        return
    raise refusal(folder, old, what)
