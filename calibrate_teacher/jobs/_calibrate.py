"""The measuring jobs: ``evaluate`` (metrics at one T) and ``calibrate`` (fit T, then bake it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.jobs._logits import LogitSource, PathLike, Progress, obtain_logits
from calibrate_teacher.specs import DataSpec, TeacherSpec

if TYPE_CHECKING:
    from calibrate_teacher.baking import BakeResult
    from calibrate_teacher.data.preprocess import PreprocessConfig
    from calibrate_teacher.metrics import CalibrationMetrics
    from calibrate_teacher.teachers.base import Inputs
    from calibrate_teacher.temperature import Objective, TemperatureFit


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`: the logits' origin and the metrics at ``temperature``.

    Attributes:
        source: The logits and where they came from.
        metrics: The calibration metrics.
        temperature: The T the metrics were computed at (1: the teacher as it is).
    """

    source: LogitSource
    metrics: CalibrationMetrics
    temperature: float = 1.0

    @property
    def notes(self) -> tuple[str, ...]:
        """Things the user should know (from loading the teacher)."""
        return self.source.notes


@dataclass(frozen=True)
class CalibrationRun:
    """The result of :func:`calibrate`: the fit, and the baked teacher when one was written.

    Attributes:
        source: The logits and where they came from.
        fit: The temperature and the metrics before and after.
        baked: The baked teacher file; None when nothing was baked (no file, or a module).
        notes: Things the user should know.
        probe: An in-memory teacher's first input rows, for ``apply_temperature(probe=...)``.
    """

    source: LogitSource
    fit: TemperatureFit
    baked: BakeResult | None = None
    notes: tuple[str, ...] = field(default=())
    probe: Inputs | None = None


def evaluate(
    teacher: TeacherSpec | PathLike | object | None = None,
    data: DataSpec | PathLike | object | None = None,
    *,
    logits: PathLike | LogitSource | None = None,
    labels: PathLike | None = None,
    temperature: float = 1.0,
    n_bins: int = 15,
    bootstrap: int = 0,
    seed: int = 0,
    save_logits: PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Evaluation:
    """Measure the teacher's calibration (at ``temperature``) on validation data or logits.

    Args:
        teacher: A :class:`~calibrate_teacher.TeacherSpec`, a teacher file, or an ``nn.Module``.
        data: A :class:`~calibrate_teacher.DataSpec`, a folder or array file, or a DataLoader.
        logits: Precomputed logits instead of ``teacher`` + ``data`` (a file or a LogitSource).
        labels: For ``.npy`` logits: the labels file.
        temperature: Measure ``softmax(logits / temperature)``.
        n_bins: Bins for the binned metrics.
        bootstrap: Resamples for 95% intervals of ECE/ACE (0: none).
        seed: Bootstrap seed.
        save_logits: Also save the teacher's logits here (checked before the teacher runs).
        overwrite: Replace ``save_logits`` if it exists.
        progress: Called after each batch with (samples done, total samples).

    Returns:
        An :class:`Evaluation`.
    """
    from calibrate_teacher.metrics import calibration_metrics

    source = obtain_logits(
        teacher, data, logits=logits, labels=labels, save_logits=save_logits, overwrite=overwrite,
        progress=progress,
    )
    ls = source.logits
    metrics = calibration_metrics(
        ls.logits, ls.labels, temperature=temperature, n_bins=n_bins, bootstrap=bootstrap, seed=seed
    )
    return Evaluation(source=source, metrics=metrics, temperature=float(temperature))


def calibrate(
    teacher: TeacherSpec | PathLike | object | None = None,
    data: DataSpec | PathLike | object | None = None,
    *,
    logits: PathLike | LogitSource | None = None,
    labels: PathLike | None = None,
    objective: Objective = "ece",
    temperature: float | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_bins: int = 15,
    grid: int = 64,
    bootstrap: int = 0,
    seed: int = 0,
    out: PathLike | None = None,
    bake: bool = True,
    save_logits: PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CalibrationRun:
    """Fit the teacher's temperature and, for a teacher file, bake it into a calibrated copy.

    Every output (``out``, ``save_logits``) is checked writable before the teacher runs. An
    in-memory teacher (an ``nn.Module`` or callable) is measured in eval mode and left as it
    was; nothing is baked: apply T with
    ``apply_temperature(teacher, run.fit.temperature, probe=run.probe)``.

    Args:
        teacher: A :class:`~calibrate_teacher.TeacherSpec`, a teacher file, or an ``nn.Module``
            / callable returning logits; needed with ``data``, and (a file) for baking.
        data: A :class:`~calibrate_teacher.DataSpec`, an image folder or array file, or an
            iterable of ``(inputs, labels)`` batches (a DataLoader).
        logits: Precomputed validation logits instead of ``data`` (a file, or a LogitSource).
        labels: For ``.npy`` logits: the labels file.
        objective: ``ece`` (default), ``nll``, ``adaece``, ``ace``, ``paper`` or ``fixed``.
        temperature: The ``T`` for ``fixed`` (default 1.5).
        bounds: The range of ``T`` searched.
        n_bins: Bins for the binned metrics.
        grid: Temperatures in the sweep.
        bootstrap: Resamples for 95% intervals of ECE/ACE.
        seed: Bootstrap seed.
        out: Where the baked teacher goes (default ``<stem>.calibrated<suffix>`` beside it).
        bake: Write the baked teacher when ``teacher`` is a file.
        save_logits: Also save the teacher's logits here.
        overwrite: Replace existing outputs.
        progress: Called after each batch with (samples done, total samples).

    Returns:
        A :class:`CalibrationRun` (with ``probe`` set for an in-memory teacher run on ``data``).

    Raises:
        InvalidValueError: ``out`` given for an in-memory teacher or without one; see also
            :func:`~calibrate_teacher.obtain_logits`.
    """
    from calibrate_teacher.temperature import fit_temperature

    spec = TeacherSpec.of(teacher) if teacher is not None else None
    file = spec.path if spec is not None else None
    if out is not None and file is None:
        raise InvalidValueError(
            "out: only a teacher file is baked into a file; for an in-memory teacher apply T "
            "with apply_temperature(teacher, run.fit.temperature, probe=run.probe)"
        )
    target = None
    if bake and file is not None:
        from calibrate_teacher._io import check_output
        from calibrate_teacher.baking import default_baked_path

        target = Path(out) if out is not None else default_baked_path(file)
        check_output(target, overwrite=overwrite, directory=file.is_dir())  # before the teacher runs
    source = obtain_logits(
        spec, data, logits=logits, labels=labels, save_logits=save_logits, overwrite=overwrite,
        progress=progress,
    )
    ls = source.logits
    fit = fit_temperature(
        ls.logits, ls.labels, objective=objective, temperature=temperature, bounds=bounds,
        n_bins=n_bins, grid=grid, bootstrap=bootstrap, seed=seed,
    )
    baked = None
    if target is not None and spec is not None and file is not None:
        from calibrate_teacher.baking import bake_temperature

        preprocess, classes = _measured_with(data, source)
        baked = bake_temperature(
            file, fit.temperature, target, overwrite=overwrite, device=spec.device,
            output=None if spec.output is None else str(spec.output), arch=spec.arch,
            arch_kwargs=spec.arch_kwargs, head=spec.head, preprocess=preprocess, classes=classes,
            probe=source.probe, input_map=spec.inputs, trust_remote_code=spec.trust_remote_code,
        )
    return CalibrationRun(source=source, fit=fit, baked=baked, notes=source.notes, probe=source.probe)


def _measured_with(data: object, source: LogitSource) -> tuple[PreprocessConfig | None, list[str] | None]:
    """What the baked teacher should carry: (preprocessing given explicitly, a listed class order).

    The teacher's own sidecar and metadata travel by themselves; only preprocessing the user
    gave for this run (``--preprocess`` or flags) is passed on, so a defaults warning stays true.
    Sorted folder names come back by themselves; a class list (a file, ``--classes``) must travel.
    """
    described = source.description.get("data")
    if not isinstance(described, dict):
        return None, None
    names = described.get("classes")
    listed = described.get("classes_from") not in (None, "sorted subfolder names")
    classes = [str(c) for c in names] if listed and isinstance(names, list) and names else None
    spec = data if isinstance(data, DataSpec) else None
    given = described.get("preprocess")
    preprocess = None
    if spec is not None and (spec.preprocess is not None or spec.overrides) and isinstance(given, dict):
        from calibrate_teacher.data.preprocess import PreprocessConfig

        preprocess = PreprocessConfig.from_dict(given, source="the calibration data")
    return preprocess, classes
