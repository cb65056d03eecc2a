"""The end-to-end jobs: get logits (from a file, or by running a teacher on data), measure, fit, bake.

These are what the ``evaluate`` and ``fit`` commands call, and what a KD script calls to do the
same in a few lines::

    import calibrate_teacher as ct

    run = ct.calibrate("teacher.onnx", data="val/")          # fit T, bake teacher.calibrated.onnx
    print(run.fit.temperature, run.fit.after.ece, run.baked.path)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.logits import LogitSet, load_logits

if TYPE_CHECKING:
    from calibrate_teacher.baking import BakeResult
    from calibrate_teacher.metrics import CalibrationMetrics
    from calibrate_teacher.temperature import Objective, TemperatureFit

__all__ = ["CalibrationRun", "Evaluation", "LogitSource", "calibrate", "evaluate", "obtain_logits"]

PathLike = str | os.PathLike[str]
#: ``progress(done, total)``: ``done`` samples were just processed out of ``total``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LogitSource:
    """Logits with where they came from.

    Attributes:
        logits: The logits and labels (and keys).
        description: JSON-ready: the logit file, or the teacher and data (preprocessing included).
        skipped: ``(key, reason)`` for each sample skipped as unreadable (``skip_bad``).
        notes: Things the user should know (which ONNX provider really ran, ...).
    """

    logits: LogitSet
    description: dict[str, object]
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`."""

    source: LogitSource
    metrics: CalibrationMetrics


@dataclass(frozen=True)
class CalibrationRun:
    """The result of :func:`calibrate`: the fit, and the baked teacher when one was written."""

    source: LogitSource
    fit: TemperatureFit
    baked: BakeResult | None = None
    notes: tuple[str, ...] = field(default=())


def obtain_logits(
    *,
    logits: PathLike | None = None,
    labels: PathLike | None = None,
    teacher: PathLike | None = None,
    data: PathLike | None = None,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    preprocess: PathLike | None = None,
    preprocess_overrides: Mapping[str, object] | None = None,
    classes: Sequence[str] | PathLike | None = None,
    skip_bad: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    save_logits: PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LogitSource:
    """Read logits from ``logits``, or run ``teacher`` over ``data`` (optionally saving them).

    Raises:
        InvalidValueError: neither or both of ``logits`` and ``data``; ``data`` without ``teacher``.
        InputError, TeacherError: unreadable files, mismatched classes, a failing teacher.
    """
    if (logits is None) == (data is None):
        raise InvalidValueError("give exactly one of --logits FILE or --data PATH")
    if logits is not None:
        logit_set = load_logits(logits, labels=labels)
        return LogitSource(
            logits=logit_set,
            description={"logits": str(logits), "num_samples": logit_set.num_samples,
                         "num_classes": logit_set.num_classes},
        )
    if teacher is None:
        raise InvalidValueError("--data needs a TEACHER model to run; or pass --logits FILE instead")
    if save_logits is not None:
        from calibrate_teacher._io import check_output

        check_output(save_logits, overwrite=overwrite)  # fail before the long run, not after it
    from calibrate_teacher.collect import collect_logits
    from calibrate_teacher.data import open_data
    from calibrate_teacher.teachers import load_teacher

    model = load_teacher(teacher, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs)
    assert data is not None
    source = open_data(
        data, preprocess=preprocess, overrides=preprocess_overrides, teacher=model, classes=classes,
        skip_bad=skip_bad,
    )
    total = len(source)
    callback = (lambda n: progress(n, total)) if progress is not None else None
    logit_set = collect_logits(model, source, batch_size=batch_size, workers=workers, progress=callback)
    if save_logits is not None:
        logit_set.save(save_logits, overwrite=overwrite)
    description: dict[str, object] = {
        "teacher": {"path": str(teacher), "format": model.format, "num_classes": model.num_classes,
                    "device": model.device},
        "data": dict(getattr(source, "description", {"path": str(data)})),
        "num_samples": logit_set.num_samples,
        "num_classes": logit_set.num_classes,
    }
    if save_logits is not None:
        description["saved_logits"] = str(save_logits)
    skipped = tuple(getattr(source, "skipped", ()))
    if skipped:
        description["skipped"] = [{"key": k, "reason": r} for k, r in skipped]
    return LogitSource(
        logits=logit_set,
        description=description,
        skipped=skipped,
        notes=tuple(getattr(model, "notes", ())),
    )


def evaluate(
    source: LogitSource,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    bootstrap: int = 0,
    seed: int = 0,
) -> Evaluation:
    """Measure the teacher's calibration (at ``temperature``) on logits from :func:`obtain_logits`."""
    from calibrate_teacher.metrics import calibration_metrics

    ls = source.logits
    metrics = calibration_metrics(
        ls.logits, ls.labels, temperature=temperature, n_bins=n_bins, bootstrap=bootstrap, seed=seed
    )
    return Evaluation(source=source, metrics=metrics)


def calibrate(
    teacher: PathLike | None = None,
    *,
    data: PathLike | None = None,
    logits: PathLike | LogitSource | None = None,
    objective: Objective = "ece",
    temperature: float | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_bins: int = 15,
    grid: int = 64,
    bootstrap: int = 0,
    seed: int = 0,
    out: PathLike | None = None,
    bake: bool = True,
    overwrite: bool = False,
    head: str | None = None,
    **source_options: object,
) -> CalibrationRun:
    """Fit the teacher's temperature and, given a teacher file, bake it into a calibrated copy.

    Args:
        teacher: The teacher model; needed with ``data``, and for baking.
        data: Validation data to run the teacher on (image folder or array file).
        logits: Precomputed validation logits instead of ``data`` (a file, or a LogitSource).
        objective: ``ece`` (default), ``nll``, ``adaece``, ``ace``, ``paper`` or ``fixed``.
        temperature: The ``T`` for ``fixed`` (default 1.5).
        bounds: The range of ``T`` searched.
        n_bins: Bins for the binned metrics.
        grid: Temperatures in the sweep.
        bootstrap: Resamples for 95% intervals of ECE/ACE.
        seed: Bootstrap seed.
        out: Where the baked teacher goes (default ``<stem>.calibrated<suffix>`` beside it).
        bake: Write the baked teacher when a teacher file is given.
        overwrite: Replace existing outputs.
        head: safetensors only: the final linear layer to fold ``1/T`` into.
        **source_options: Passed to :func:`obtain_logits` (device, batch_size, arch, ...).

    Returns:
        A :class:`CalibrationRun`.
    """
    from calibrate_teacher.temperature import fit_temperature

    if isinstance(logits, LogitSource):
        source = logits
    else:
        source = obtain_logits(logits=logits, teacher=teacher, data=data, overwrite=overwrite,
                               **source_options)  # type: ignore[arg-type]
    will_bake = bake and teacher is not None
    if will_bake:
        from calibrate_teacher._io import check_output
        from calibrate_teacher.baking import default_baked_path

        assert teacher is not None
        check_output(out if out is not None else default_baked_path(teacher), overwrite=overwrite)
    ls = source.logits
    fit = fit_temperature(
        ls.logits, ls.labels, objective=objective, temperature=temperature, bounds=bounds,
        n_bins=n_bins, grid=grid, bootstrap=bootstrap, seed=seed,
    )
    baked = None
    if will_bake:
        from calibrate_teacher.baking import bake_temperature, default_baked_path

        assert teacher is not None
        keys = ("device", "output", "arch", "arch_kwargs")
        baked = bake_temperature(
            teacher, fit.temperature, out if out is not None else default_baked_path(teacher),
            overwrite=overwrite, head=head,
            **{k: v for k, v in source_options.items() if k in keys},  # type: ignore[arg-type]
        )
    return CalibrationRun(source=source, fit=fit, baked=baked, notes=source.notes)


def default_report_path(teacher: PathLike) -> Path:
    """``<stem>.calibration.json`` beside the teacher."""
    p = Path(teacher)
    return p.with_name(f"{p.stem}.calibration.json")
