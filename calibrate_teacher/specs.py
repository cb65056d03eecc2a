"""What to load and how: :class:`TeacherSpec` and :class:`DataSpec`.

The jobs (:mod:`calibrate_teacher.jobs`) take these two value objects instead of a dozen loose
keywords, and the CLI builds each one once from its shared option groups. Each spec accepts a
file path *or* the object a KD script already holds: a ``torch.nn.Module`` (or any callable
returning logits) for the teacher, any iterable of batches (a ``DataLoader``) for the data::

    import calibrate_teacher as ct

    ct.TeacherSpec("teacher.onnx", device="cuda")
    ct.TeacherSpec("w.safetensors", arch="models.py:resnet18", arch_kwargs={"num_classes": 10})
    ct.DataSpec("val/", classes="classes.txt", skip_bad=True)
    ct.DataSpec(val_loader)

Jobs also accept the bare path, module or loader and wrap it with the defaults
(:meth:`TeacherSpec.of`, :meth:`DataSpec.of`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from calibrate_teacher._device import check_device
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    from calibrate_teacher.data.base import DataSource
    from calibrate_teacher.data.preprocess import PreprocessConfig
    from calibrate_teacher.teachers.base import Teacher

__all__ = ["DataSpec", "Device", "TeacherSpec"]

PathLike: TypeAlias = "str | os.PathLike[str]"
#: Where a teacher runs: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
Device: TypeAlias = str


def _is_path(value: object) -> bool:
    return isinstance(value, str | os.PathLike)


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher to load, and how.

    Attributes:
        source: A teacher file (``.onnx``, TorchScript, ``.safetensors``/state dict with
            ``arch``, ``.pt2``), or an in-memory ``torch.nn.Module`` / callable returning logits.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (files only: a module stays where it is).
        output: Which output holds the logits when there are several: an ONNX output name, a
            key of a returned mapping (default ``logits``), or an index into a tuple.
        arch: For weights-only files: ``pkg.module:factory`` or ``path/file.py:factory``
            (imported only when given).
        arch_kwargs: Keyword arguments for ``arch`` (a mapping, or a JSON object string).
        head: safetensors/state dict bakes: the ``nn.Linear`` to fold 1/T into.
    """

    source: object
    device: Device = "auto"
    output: str | int | None = None
    arch: str | None = None
    arch_kwargs: Mapping[str, object] | str | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            raise InvalidValueError("a teacher is needed: give a model file or a torch.nn.Module")
        if _is_path(self.source):
            object.__setattr__(self, "source", Path(self.source))  # type: ignore[arg-type]
        elif not (callable(self.source) or callable(getattr(self.source, "logits", None))):
            raise InvalidValueError(
                f"teacher {type(self.source).__name__}: expected a model file path, a "
                "torch.nn.Module or a callable that returns logits"
            )
        elif self.arch is not None or self.arch_kwargs is not None or self.head is not None:
            raise InvalidValueError(
                "arch/arch_kwargs/head: apply to weight files; the teacher is already a model in memory"
            )
        check_device(self.device)
        if isinstance(self.arch_kwargs, str):
            from calibrate_teacher.teachers._arch import parse_arch_kwargs

            parse_arch_kwargs(self.arch_kwargs)  # a malformed JSON string fails here, not later

    @classmethod
    def of(cls, teacher: TeacherSpec | PathLike | object) -> TeacherSpec:
        """``teacher`` itself if it is a spec, else a spec of it with the defaults."""
        return teacher if isinstance(teacher, TeacherSpec) else cls(teacher)

    @property
    def path(self) -> Path | None:
        """The teacher file, or None for an in-memory teacher."""
        return self.source if isinstance(self.source, Path) else None

    def load(self) -> Teacher:
        """Load the teacher (see :func:`~calibrate_teacher.load_teacher`)."""
        from calibrate_teacher.teachers import as_teacher, load_teacher

        if self.path is not None:
            output = None if self.output is None else str(self.output)
            return load_teacher(
                self.path, device=self.device, output=output, arch=self.arch, arch_kwargs=self.arch_kwargs
            )
        model = as_teacher(self.source, output=self.output)  # type: ignore[arg-type]
        device = self.device
        if device != "auto" and device != model.device and not model.device.startswith(f"{device}:"):
            raise InvalidValueError(
                f"device {device!r}: {model.path} is on {model.device} and is never moved; move it "
                "yourself (module.to(device)) or leave device='auto'"
            )
        return model


@dataclass(frozen=True)
class DataSpec:
    """Which data to run the teacher on, and how to read it.

    Attributes:
        source: An image folder (``val/<class>/<image>``), an array file (``.npz``,
            ``.safetensors``, ``.npy`` with ``inputs`` and ``labels``), or any iterable of
            batches: ``(inputs, labels)`` pairs or mappings with a ``labels`` key (a DataLoader).
        preprocess: Image folders: a preprocess JSON or config (default: the sidecar beside
            the teacher, then its input shape).
        overrides: Image folders: single preprocessing keys that win (CLI flags).
        classes: Class names in label order, or a file of them (one per line).
        skip_bad: Skip unreadable images (listed in the result) instead of failing.
        batch_size: Samples per teacher call (files; a loader brings its own batches).
        workers: Data-loading worker processes (0: in this process).
    """

    source: object
    preprocess: PathLike | PreprocessConfig | None = None
    overrides: Mapping[str, object] | None = None
    classes: Sequence[str] | PathLike | None = None
    skip_bad: bool = False
    batch_size: int = 64
    workers: int = 0

    def __post_init__(self) -> None:
        if self.source is None:
            raise InvalidValueError("data is needed: give a folder, an array file or a DataLoader")
        if _is_path(self.source):
            object.__setattr__(self, "source", Path(self.source))  # type: ignore[arg-type]
        elif not (isinstance(self.source, Iterable) or callable(getattr(self.source, "batches", None))):
            raise InvalidValueError(
                f"data {type(self.source).__name__}: expected a folder or file path, or an "
                "iterable of (inputs, labels) batches such as a DataLoader"
            )
        else:
            given = [
                name
                for name, value in (("preprocess", self.preprocess), ("overrides", self.overrides))
                if value
            ] + (["skip_bad"] if self.skip_bad else []) + (["workers"] if self.workers else [])
            if given:
                raise InvalidValueError(
                    f"{', '.join(given)}: apply to data files and folders; an iterable's batches "
                    "are fed to the teacher as they come"
                )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidValueError(f"batch_size {self.batch_size!r}: must be an integer >= 1")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise InvalidValueError(f"workers {self.workers!r}: must be an integer >= 0")

    @classmethod
    def of(cls, data: DataSpec | PathLike | object) -> DataSpec:
        """``data`` itself if it is a spec, else a spec of it with the defaults."""
        return data if isinstance(data, DataSpec) else cls(data)

    @property
    def path(self) -> Path | None:
        """The data folder or file, or None for an in-memory iterable."""
        return self.source if isinstance(self.source, Path) else None

    def open(self, teacher: Teacher) -> DataSource:
        """Open the data as a source of batches for ``teacher``."""
        from calibrate_teacher.data import as_source, open_data

        if self.path is None:
            return as_source(self.source, classes=self.classes)  # type: ignore[arg-type]
        from calibrate_teacher.teachers import find_model_classes, find_model_preprocessing

        # An in-memory module has no sidecar beside it and knows its classes only once it runs.
        model = None if teacher.format == "module" else teacher
        folder = model is not None and self.path.is_dir()
        # Only image folders are preprocessed: a broken sidecar must not fail an array file.
        layers = find_model_preprocessing(model.path) if folder and model is not None else ()
        classes = self.classes
        if classes is None and folder and model is not None and not (self.path / "classes.txt").is_file():
            # The class order a (baked) teacher carries, as the original was measured with.
            carried = find_model_classes(model.path)
            classes = list(carried[0]) if carried is not None else None
        return open_data(
            self.path, preprocess=self.preprocess, overrides=self.overrides, model_layers=layers,
            teacher=model, classes=classes, skip_bad=self.skip_bad,
        )

