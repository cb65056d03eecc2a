"""The token jobs: ``evaluate_tokens`` (token metrics at one T) and ``calibrate_tokens`` (fit T over tokens).

For causal LMs and token classifiers (``calibrate_teacher.tokens``). One inference pass runs
the teacher over the data, measures it at T = 1 on the way, and keeps the scored tokens in a
temporary store (final hidden states for an LM with a head); the fit's passes replay the store,
which is deleted before the job returns. Baking is not done here: bake the returned
``run.fit.temperature`` into a Hugging Face directory with ``teachers/_lm_head.py``'s
``fold_lm_temperature`` (or ``bake_temperature``) afterwards.

On glibc the jobs fix the allocator's mmap threshold at 1 MiB for the process (once; not where
``MALLOC_MMAP_THRESHOLD_`` is set), so that the passes' freed chunks leave memory: see
``tokens/_malloc.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._version import tool_version

if TYPE_CHECKING:
    from rich.table import Table

    from calibrate_teacher.baking import BakeResult
    from calibrate_teacher.temperature import Objective
    from calibrate_teacher.tokens._collect import Collected, Progress
    from calibrate_teacher.tokens.fit import TokenFit
    from calibrate_teacher.tokens.metrics import TokenMetrics
    from calibrate_teacher.tokens.teacher import TokenTeacher

#: The JSON documents' version (shared with ``report.REPORT_FORMAT_VERSION``).
_FORMAT_VERSION = 2
_ROWS = (
    ("accuracy", "top-1 accuracy", True),
    ("confidence", "mean confidence", True),
    ("nll", "NLL per token", False),
    ("perplexity", "perplexity", False),
    ("brier", "Brier", False),
    ("ece", "ECE", False),
    ("ece_over", "  over-confident part", False),
    ("ece_under", "  under-confident part", False),
    ("mce", "MCE", False),
    ("adaece", "AdaECE", False),
    ("sequence_ece", "per-sequence ECE", False),
    ("ace", "ACE", False),
    ("tace", "TACE", False),
    ("classwise_ece", "classwise ECE", False),
)


def _teacher_json(teacher: TokenTeacher) -> dict[str, object]:
    return {
        "path": str(teacher.path),
        "format": teacher.format,
        "task": teacher.task,
        "vocab_size": teacher.vocab_size,
        "device": teacher.device,
        "class_names": list(teacher.class_names) if teacher.class_names else None,
    }


def _data_json(data: object, collected: Collected) -> dict[str, object]:
    described = getattr(data, "description", None)
    out: dict[str, object] = dict(described) if isinstance(described, dict) else {"kind": type(data).__name__}
    out.update(sequences=collected.num_sequences, tokens=collected.num_tokens)
    return out


def _data_notes(data: object) -> tuple[str, ...]:
    """A token DataSource's notes (defaults it used, e.g. ``max_length``); an iterable has none."""
    notes = getattr(data, "notes", None)
    return tuple(str(n) for n in notes) if isinstance(notes, list | tuple) else ()


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def token_metrics_table(before: TokenMetrics, after: TokenMetrics | None = None) -> Table:
    """A rich table of the token metrics; with ``after``, before/after columns and the change."""
    from rich.table import Table

    table = Table(title=f"Token calibration ({before.num_tokens:,} scored tokens, {before.num_sequences:,} sequences)")
    table.add_column("metric")
    table.add_column(f"T = {before.temperature:g}", justify="right")
    if after is not None:
        table.add_column(f"T = {after.temperature:.4g}", justify="right")
        table.add_column("change", justify="right")
    for key, label, percent in _ROWS:
        b = getattr(before, key)
        row = [label, _fmt(b, percent)]
        if after is not None:
            a = getattr(after, key)
            change = "" if a is None or b is None else (f"{100 * (a - b):+.2f} pt" if percent else f"{a - b:+.4f}")
            row += [_fmt(a, percent), change]
        table.add_row(*row)
    if before.not_computed:
        table.caption = "; ".join(f"{k}: {v}" for k, v in before.not_computed.items() if k != "tace")
    return table


@dataclass(frozen=True)
class TokenEvaluation:
    """The result of :func:`evaluate_tokens`.

    Attributes:
        teacher: What was measured (JSON-ready).
        data: The data, with its sequence and token counts (JSON-ready).
        metrics: The token metrics at ``temperature``.
        temperature: The T measured at.
        task: ``causal-lm`` or ``token-classification``.
        seconds: Wall time of the inference pass.
        notes: Things the user should know.
    """

    teacher: dict[str, object]
    data: dict[str, object]
    metrics: TokenMetrics
    temperature: float
    task: str
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def table(self) -> Table:
        """A rich table of the metrics."""
        return token_metrics_table(self.metrics)

    def to_json(self) -> dict[str, object]:
        """The JSON report, shaped as ``report.evaluation_document`` plus ``task`` and ``unit``."""
        from calibrate_teacher.tokens.metrics import TOKEN_DEFINITIONS

        return {
            "format_version": _FORMAT_VERSION,
            "tool": {"name": "calibrate-teacher", "version": tool_version()},
            "kind": "evaluation",
            "task": self.task,
            "unit": "token",
            "source": {"teacher": self.teacher, "data": self.data},
            "notes": list(self.notes),
            "temperature": self.temperature,
            "metrics": self.metrics.to_json(),
            "definitions": dict(TOKEN_DEFINITIONS),
        }


@dataclass(frozen=True)
class TokenCalibrationRun:
    """The result of :func:`calibrate_tokens`: the fit over scored tokens.

    Attributes:
        teacher: What was fitted (JSON-ready).
        data: The data, with its sequence and token counts (JSON-ready).
        fit: The temperature, the sweep and the metrics before and after.
        task: ``causal-lm`` or ``token-classification``.
        seconds: ``{"inference": s, "fit": s}`` wall times.
        notes: Things the user should know (the store, the head check, defaults used).
        baked: The baked Hugging Face directory (``bake=True``), else None.
    """

    teacher: dict[str, object]
    data: dict[str, object]
    fit: TokenFit
    task: str
    seconds: dict[str, float]
    notes: tuple[str, ...] = field(default=())
    baked: BakeResult | None = None

    @property
    def temperature(self) -> float:
        """The fitted T (divide the teacher's logits by it)."""
        return self.fit.temperature

    def table(self) -> Table:
        """A rich table of the metrics before and after."""
        return token_metrics_table(self.fit.before, self.fit.after)

    def to_json(self) -> dict[str, object]:
        """The JSON report, shaped as ``report.fit_document`` plus ``task`` and ``unit``."""
        doc: dict[str, object] = {
            "format_version": _FORMAT_VERSION,
            "tool": {"name": "calibrate-teacher", "version": tool_version()},
            "kind": "fit",
            "task": self.task,
            "source": {"teacher": self.teacher, "data": self.data},
            "notes": list(self.notes),
            "seconds": dict(self.seconds),
        }
        doc.update(self.fit.to_json())
        doc["baked"] = self.baked.to_json() if self.baked is not None else None
        return doc


def _open(teacher: object, task: str | None, device: str) -> TokenTeacher:
    from calibrate_teacher.specs import TeacherSpec
    from calibrate_teacher.tokens.teacher import load_token_teacher

    if isinstance(teacher, TeacherSpec):  # the CLI's: device and trust_remote_code ride on the spec
        return teacher.load_tokens()
    return load_token_teacher(teacher, task=task, device=device)  # type: ignore[arg-type]


def _open_data(teacher: object, data: object, model: TokenTeacher, batch_size: int) -> tuple[object, int]:
    """A :class:`~calibrate_teacher.DataSpec` opened as token sequences (with its batch size); else ``data``."""
    from calibrate_teacher.specs import DataSpec, TeacherSpec

    if not isinstance(data, DataSpec):
        return data, batch_size
    trust = teacher.trust_remote_code if isinstance(teacher, TeacherSpec) else False
    return data.open_tokens(model, trust_remote_code=trust), data.batch_size


def evaluate_tokens(
    teacher: TokenTeacher | str | os.PathLike[str] | object,
    data: object,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    batch_size: int = 8,
    task: str | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> TokenEvaluation:
    """Measure a sequence teacher's token-level calibration (at ``temperature``).

    Args:
        teacher: A Hugging Face directory, an ``.onnx`` file, a transformers model, an
            ``nn.Module`` returning ``[B, S, V]``, or a loaded :class:`~calibrate_teacher.tokens.TokenTeacher`.
        data: Batches with ``input_ids``, ``attention_mask`` and unshifted labels ``[B, S]``
            (-100 where not scored): a DataSource, a list or a DataLoader.
        temperature: Measure ``softmax(logits / temperature)``.
        n_bins: Bins for the binned metrics.
        batch_size: Batch size of a DataSource.
        task: ``causal-lm`` or ``token-classification`` (read from ``config.json`` where not given).
        device: Where a teacher file runs (``auto``: CUDA when present).
        progress: Called after each batch with (tokens so far, None).

    Returns:
        A :class:`TokenEvaluation`.
    """
    from calibrate_teacher._validate import validate_options
    from calibrate_teacher.tokens._collect import collect_tokens
    from calibrate_teacher.tokens._store import TokenStore
    from calibrate_teacher.tokens.metrics import TokenMetricsAccumulator

    validate_options(n_bins=n_bins)
    t = _temperature(temperature)
    model = _open(teacher, task, device)
    data, batch_size = _open_data(teacher, data, model, batch_size)
    acc_device = model.device if model.device.startswith("cuda") else "cpu"
    collected, acc = collect_tokens(
        model, data, batch_size=batch_size, keep=False, progress=progress,
        accumulator=lambda v: TokenMetricsAccumulator(vocab_size=v, n_bins=n_bins, temperature=t, device=acc_device),
    )
    assert acc is not None
    store = collected.scored
    try:
        logits = store.logits_tensor() if isinstance(store, TokenStore) and store.kind == "logits" else None
        metrics = acc.result(num_sequences=collected.num_sequences, logits=logits)
    finally:
        if isinstance(store, TokenStore):
            store.close()
    return TokenEvaluation(
        teacher=_teacher_json(model), data=_data_json(data, collected), metrics=metrics, temperature=t,
        task=model.task, seconds=collected.seconds, notes=(*model.notes, *_data_notes(data), *collected.notes),
    )


def calibrate_tokens(
    teacher: TokenTeacher | str | os.PathLike[str] | object,
    data: object,
    *,
    objective: Objective = "ece",
    temperature: float | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_bins: int = 15,
    grid: int = 32,
    tol: float = 1e-5,
    batch_size: int = 8,
    task: str | None = None,
    device: str = "auto",
    store_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    bake: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TokenCalibrationRun:
    """Fit a sequence teacher's temperature over its scored tokens (no ``[tokens, V]`` matrix).

    Args:
        teacher: As :func:`evaluate_tokens`.
        data: As :func:`evaluate_tokens`; replayed when the teacher gives only logits and ``V > 1000``.
        objective: ``ece`` (default, as ``calibrate``), ``nll`` (exact), ``adaece``, ``ace``
            (``V <= 1000``), ``paper`` or ``fixed``.
        temperature: The ``T`` for ``fixed`` (default 1.5).
        bounds: The range of ``T`` searched.
        n_bins: Bins for the binned metrics.
        grid: Temperatures in the sweep (all in one pass).
        tol: Tolerance of the search.
        batch_size: Batch size of a DataSource.
        task: ``causal-lm`` or ``token-classification``.
        device: Where a teacher file runs.
        store_dir: Where the temporary token store goes (default: the system's temp folder).
        out: ``bake=True``: where the baked directory goes (default ``<dir>-calibrated``).
        bake: Bake T into a Hugging Face directory teacher (``bake_temperature``: the LM head,
            or the final norm of a tied one), checked on the data's first sequences.
        overwrite: Replace ``out`` if it exists.
        progress: Called after each batch of the inference pass with (tokens so far, None).

    Returns:
        A :class:`TokenCalibrationRun` (``baked`` set when ``bake``).
    """
    import time

    from calibrate_teacher._validate import validate_options
    from calibrate_teacher.tokens._collect import collect_tokens
    from calibrate_teacher.tokens._store import TokenStore
    from calibrate_teacher.tokens.fit import fit_token_temperature
    from calibrate_teacher.tokens.metrics import TokenMetricsAccumulator

    validate_options(n_bins=n_bins)
    target = _bake_target(teacher, out, overwrite=overwrite) if bake else None  # checked before the long run
    model = _open(teacher, task, device)
    data, batch_size = _open_data(teacher, data, model, batch_size)
    acc_device = model.device if model.device.startswith("cuda") else "cpu"
    collected, acc = collect_tokens(
        model, data, batch_size=batch_size, keep=True, progress=progress,
        store_dir=None if store_dir is None else str(Path(store_dir)),
        accumulator=lambda v: TokenMetricsAccumulator(vocab_size=v, n_bins=n_bins, device=acc_device),
    )
    store = collected.scored
    assert store is not None
    assert acc is not None
    notes = [*model.notes, *_data_notes(data), *collected.notes]
    if objective == "ece" and temperature is None:
        notes.append("objective: ece (the default)")
    start = time.perf_counter()
    try:
        logits = store.logits_tensor() if isinstance(store, TokenStore) and store.kind == "logits" else None
        before = acc.result(num_sequences=collected.num_sequences, logits=logits)
        fit = fit_token_temperature(
            store, objective=objective, temperature=temperature, bounds=bounds, n_bins=n_bins, grid=grid,
            tol=tol, before=before, num_sequences=collected.num_sequences,
        )
    finally:
        if isinstance(store, TokenStore):
            store.close()
    baked = None
    if target is not None:
        baked = _bake(teacher, model, data, fit.temperature, target, overwrite=overwrite)
    return TokenCalibrationRun(
        teacher=_teacher_json(model), data=_data_json(data, collected), fit=fit, task=model.task,
        seconds={"inference": collected.seconds, "fit": time.perf_counter() - start}, notes=tuple(notes),
        baked=baked,
    )


def _bake_target(teacher: object, out: str | os.PathLike[str] | None, *, overwrite: bool) -> Path:
    """Where the baked directory goes, checked writable now; only a Hugging Face directory bakes."""
    from calibrate_teacher._io import check_output
    from calibrate_teacher.baking import default_baked_path
    from calibrate_teacher.errors import InvalidValueError
    from calibrate_teacher.specs import TeacherSpec

    source = teacher.path if isinstance(teacher, TeacherSpec) else teacher
    if not (isinstance(source, str | os.PathLike) and Path(source).is_dir()):
        raise InvalidValueError(
            "bake: only a Hugging Face model directory is baked by the token jobs; fit with bake=False "
            "(--no-bake) and apply run.temperature yourself"
        )
    target = Path(out) if out is not None else default_baked_path(source)
    return check_output(target, overwrite=overwrite, directory=True)


def _bake(
    teacher: object, model: TokenTeacher, data: object, temperature: float, target: Path, *, overwrite: bool
) -> BakeResult:
    """Bake T into the teacher directory, proven on the data's first sequences where they can be read."""
    from calibrate_teacher.baking import bake_temperature
    from calibrate_teacher.collect import first_inputs
    from calibrate_teacher.data.base import DataSource
    from calibrate_teacher.specs import TeacherSpec

    spec = teacher if isinstance(teacher, TeacherSpec) else None
    source = model.path
    probe = None
    if isinstance(data, DataSource) and callable(getattr(data, "batches", None)) and len(data) > 0:
        inputs = first_inputs(data, rows=2)
        probe = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")} if isinstance(
            inputs, dict) else inputs
    return bake_temperature(
        source, temperature, target, overwrite=overwrite, device=model.device, probe=probe,
        trust_remote_code=spec.trust_remote_code if spec is not None else False,
    )


def _temperature(value: float) -> float:
    from calibrate_teacher._validate import validate_temperature

    return validate_temperature(value)
