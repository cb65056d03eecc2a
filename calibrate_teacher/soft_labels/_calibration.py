"""The calibration a soft-label cache was written at: T, how it was chosen, and the fit report's checks.

:class:`Calibration` is the manifest's ``calibration`` block. :meth:`Calibration.from_report` reads
T from a ``calibrate-teacher fit`` report and checks that the report was fitted for the teacher
and the preprocessing being exported; the rest of the manifest is in ``_format.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from calibrate_teacher.errors import InputError

__all__ = ["Calibration"]


@dataclass(frozen=True)
class Calibration:
    """The temperature a cache was written at, and how it was chosen.

    Only the first five fields are the manifest's ``calibration`` block (and compared); the
    rest are what a fit report said about its own run, kept to check an export against it.

    Attributes:
        temperature: T; the cache stores ``logits / T``. Keep it: it is the teacher's calibration.
        method: ``"fixed"`` (given by hand) or ``"fit"`` (chosen by ``calibrate-teacher fit``).
        objective: The fit's objective (``"ece"``, ``"nll"``...), where known.
        metrics: The teacher's calibration metrics at T, where known.
        report: The fit report's file name, where T came from one.
        report_teacher: The report's ``source.teacher`` (``sha256``, ``format``, ``path``...),
            with ``baked_sha256`` added from its ``baked.sha256``; None where it records none.
        report_preprocess: The report's ``source.data.preprocess`` (timm keys), where recorded.
        warnings: One line each: what :meth:`from_report` could not check, or let pass with
            ``force``, or found different (preprocessing). For the caller to show; never raised.
    """

    temperature: float
    method: str = "fixed"
    objective: str | None = None
    metrics: Mapping[str, float] | None = None
    report: str | None = None
    report_teacher: Mapping[str, object] | None = field(default=None, compare=False)
    report_preprocess: Mapping[str, object] | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        from calibrate_teacher._validate import validate_temperature

        validate_temperature(self.temperature)

    @classmethod
    def from_report(
        cls,
        path: str | os.PathLike[str],
        *,
        teacher: Mapping[str, object] | str | os.PathLike[str] | None = None,
        preprocess: Mapping[str, object] | None = None,
        force: bool = False,
    ) -> Calibration:
        """Read T, the objective and the after-metrics from a ``fit`` report JSON.

        With ``teacher``, the report must have been fitted for it: the report's
        ``source.teacher.sha256`` and ``source.teacher.format`` are compared with the teacher's
        (see :meth:`check_teacher`). With ``preprocess``, the report's
        ``source.data.preprocess`` is compared with it (see :meth:`check_preprocess`); a
        difference is a line in ``warnings``, not an error.

        Args:
            path: The report ``calibrate-teacher fit --report`` wrote.
            teacher: The teacher being exported: its manifest block (``sha256``, ``format``,
                ``file``), or its file (then only the SHA-256 is compared).
            preprocess: The preprocessing the export uses (``PreprocessConfig.to_json()``, or the
                image source's ``description["preprocess"]``); None: not checked here (call
                :meth:`check_preprocess` once the data is open, with None for array data).
            force: Accept a report made for another teacher (the mismatch becomes a warning).

        Returns:
            The calibration, with ``warnings`` from the checks.

        Raises:
            InputError: the file is missing, not JSON, has no numeric ``temperature`` or a
                malformed ``source``; or, unless ``force``, it was fitted for another teacher.
            InvalidValueError: the temperature is not a finite number > 0.
        """
        p = Path(path)
        try:
            report = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"{p}: no such fit report; run `calibrate-teacher fit` first"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: not a readable JSON fit report ({exc})") from exc
        t = report.get("temperature") if isinstance(report, dict) else None
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise InputError(
                f"{p}: no numeric top-level 'temperature'; pass the report that "
                "`calibrate-teacher fit --report` wrote, or use --temperature"
            )
        after = report.get("after")
        metrics = (
            {
                str(k): float(v)
                for k, v in after.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if isinstance(after, dict)
            else None
        )
        objective = report.get("objective")
        recorded_teacher, recorded_preprocess = cls._report_source(report, p)
        calibration = cls(
            temperature=float(t),
            method="fit",
            objective=str(objective) if objective is not None else None,
            metrics=metrics,
            report=p.name,
            report_teacher=recorded_teacher,
            report_preprocess=recorded_preprocess,
        )
        found: list[str] = []
        if teacher is not None:
            found += calibration.check_teacher(teacher, force=force)
        if preprocess is not None:
            found += calibration.check_preprocess(preprocess)
        if not found:
            return calibration
        from dataclasses import replace

        return replace(calibration, warnings=tuple(found))

    def check_teacher(
        self, teacher: Mapping[str, object] | str | os.PathLike[str], *, force: bool = False
    ) -> tuple[str, ...]:
        """Check that the report this T came from was fitted for ``teacher``.

        Compares ``sha256`` and ``format`` where both sides have them (a path gives its
        SHA-256 only). A report that records no teacher (a fit from ``--logits``) or no SHA-256
        cannot be checked: that is a warning, not an error.

        Args:
            teacher: The teacher's manifest block (``sha256``, ``format``, ``file``) or its file.
            force: Return the mismatch as a warning instead of raising.

        Returns:
            Warning lines (empty when the report matches, or T did not come from a report).

        Raises:
            InputError: the report was fitted for another teacher (or ``teacher`` is the one
                this report baked), and ``force`` is false.

        Example:
            >>> fitted = {"path": "a.onnx", "format": "onnx", "sha256": "ab" * 32}
            >>> cal = Calibration(1.7, "fit", report="fit.json", report_teacher=fitted)
            >>> cal.check_teacher({"file": "a.onnx", "format": "onnx", "sha256": "ab" * 32})
            ()
            >>> other = {"file": "b.onnx", "format": "onnx", "sha256": "cd" * 32}
            >>> print(cal.check_teacher(other, force=True)[0][:62])
            forced: fit.json: fitted for teacher a.onnx (onnx, sha256 abab
        """
        if self.method != "fit" or self.report is None:
            return ()
        given = self._teacher_identity(teacher)
        name = self.report
        ours = self.report_teacher or {}
        compared = [k for k in ("sha256", "format") if ours.get(k) and given.get(k)]
        if given.get("sha256") and given["sha256"] == ours.get("baked_sha256"):
            problem = (
                f"{name}: {self._describe(given, with_format=False)} is the teacher this report baked "
                f"(its outputs are already logits / {self.temperature:g}); export it with "
                "--temperature 1, or export the original teacher with --from-report"
            )
        elif any(ours[k] != given[k] for k in compared):
            problem = (
                f"{name}: fitted for teacher {self._describe(ours)} but the teacher given is "
                f"{self._describe(given)}; fit this teacher (`calibrate-teacher fit TEACHER "
                "--report FILE`) or pass --force to use this T anyway"
            )
        elif "sha256" in compared:
            return ()
        else:
            what = "only the format was compared" if compared else "nothing could be compared"
            return (
                f"{name}: {what}: the report (source.teacher.sha256) or "
                f"{self._describe(given, with_format=False)} has no sha256; make sure T was "
                "fitted for this teacher",
            )
        if not force:
            raise InputError(problem)
        return (f"forced: {problem.split('; ')[0]}",)

    def check_preprocess(self, preprocess: Mapping[str, object] | None) -> tuple[str, ...]:
        """Compare the preprocessing an export uses with the one the fit's report records.

        Soft labels computed from inputs preprocessed otherwise than in the fit are not
        calibrated at T as measured, so a difference is flagged; it is not refused (a
        deliberate change, e.g. another resize for the training split, stays possible).

        Args:
            preprocess: The export's preprocessing (timm keys, ``PreprocessConfig.to_json()``),
                or None where the export feeds stored arrays.

        Returns:
            Warning lines: one naming the keys that differ and both values, or one saying that
            the two cannot be compared; empty when they match or neither records any.
        """
        if self.method != "fit" or self.report is None:
            return ()
        ours = self.report_preprocess
        if ours is None and preprocess is None:
            return ()
        if ours is None or preprocess is None:
            which = "records no preprocessing" if ours is None else "records image preprocessing"
            other = "the export's" if ours is None else "the export feeds stored arrays, so its"
            return (
                f"{self.report}: {which}; {other} preprocessing cannot be compared with the fit's",
            )
        keys = [k for k in dict.fromkeys([*ours, *preprocess]) if not self._same_value(ours.get(k), preprocess.get(k))]
        if not keys:
            return ()
        fit = ", ".join(f"{k} {self._text(ours.get(k))}" for k in keys)
        export = ", ".join(f"{k} {self._text(preprocess.get(k))}" for k in keys)
        return (
            f"{self.report}: the fit preprocessed images with {fit} but this export uses {export}; "
            "soft labels from other preprocessing are not calibrated at T as measured: pass the "
            "fit's --preprocess / flags",
        )

    @staticmethod
    def _report_source(
        report: Mapping[str, object], path: Path
    ) -> tuple[dict[str, object] | None, dict[str, object] | None]:
        """The report's ``source.teacher`` (+ ``baked.sha256``) and ``source.data.preprocess``."""
        source = report.get("source")
        if source is None:
            return None, None
        if not isinstance(source, dict):
            raise InputError(f"{path}: 'source' is not an object; pass the report `fit --report` wrote")
        teacher, data = source.get("teacher"), source.get("data")
        preprocess = data.get("preprocess") if isinstance(data, dict) else None
        for where, value in (("source.teacher", teacher), ("source.data.preprocess", preprocess)):
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{path}: '{where}' is not an object; pass the report `fit --report` wrote")
        recorded = dict(teacher) if isinstance(teacher, dict) else None
        baked = report.get("baked")
        if recorded is not None and isinstance(baked, dict) and baked.get("sha256"):
            recorded["baked_sha256"] = baked["sha256"]
        for key in ("sha256", "format", "baked_sha256"):
            if recorded is not None and not isinstance(recorded.get(key), str | None):
                raise InputError(f"{path}: teacher '{key}' is not a string; pass the report `fit --report` wrote")
        return recorded, (dict(preprocess) if isinstance(preprocess, dict) else None)

    @staticmethod
    def _teacher_identity(teacher: Mapping[str, object] | str | os.PathLike[str]) -> dict[str, object]:
        if isinstance(teacher, Mapping):
            return dict(teacher)
        from calibrate_teacher._io import sha256_file

        return {"file": Path(teacher).name, "sha256": sha256_file(teacher)}

    @staticmethod
    def _describe(teacher: Mapping[str, object], *, with_format: bool = True) -> str:
        named = teacher.get("file") or teacher.get("path")
        name = Path(str(named)).name if named else "the teacher"
        facts = [str(teacher["format"])] if with_format and teacher.get("format") else []
        if teacher.get("sha256"):
            facts.append(f"sha256 {str(teacher['sha256'])[:12]}")
        return f"{name} ({', '.join(facts)})" if facts else name

    @staticmethod
    def _same_value(a: object, b: object) -> bool:
        """Equal as JSON values, numbers to within float round-off (``[0.5]`` == ``(0.5,)``)."""
        import math

        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            return len(a) == len(b) and all(Calibration._same_value(x, y) for x, y in zip(a, b, strict=True))
        numbers = (int, float)
        if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        return a == b

    @staticmethod
    def _text(value: object) -> str:
        if isinstance(value, list | tuple):
            return "[" + ", ".join(Calibration._text(v) for v in value) + "]"
        if isinstance(value, float):
            return f"{value:.6g}"
        return "(none)" if value is None else str(value)

    def to_json(self) -> dict[str, object]:
        """Return the manifest's ``calibration`` block."""
        return {
            "temperature": float(self.temperature),
            "method": self.method,
            "objective": self.objective,
            "metrics": dict(self.metrics) if self.metrics is not None else None,
            "report": self.report,
        }
