"""Data sources that feed a teacher: image folders, array files, and any iterable of batches.

:func:`open_data` picks the source from the path: a folder is an ImageFolder layout
(``val/<class>/<image>``, see :mod:`calibrate_teacher.data.images`), a ``.npz`` /
``.safetensors`` / ``.npy`` file holds already-preprocessed ``inputs`` and ``labels`` (see
:mod:`calibrate_teacher.data.arrays`). Given the teacher, it also finds the preprocessing
(:func:`~calibrate_teacher.data.preprocess.resolve_preprocess`) and checks that the data fits
the model (input shape, number of classes) before a single image is decoded.

:func:`as_source` takes what a KD script holds instead: a DataLoader (or any iterable of
``(inputs, labels)`` pairs or of mappings with ``labels``) becomes an
:class:`~calibrate_teacher.data.iterable.IterableSource`, read as it yields.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.data.arrays import ARRAY_SUFFIXES, ArraySource
from calibrate_teacher.data.base import Batch, DataSource
from calibrate_teacher.data.dataset import ImageFolderDataset
from calibrate_teacher.data.images import IMAGE_SUFFIXES, ImageFolderSource, read_class_list
from calibrate_teacher.data.iterable import IterableSource
from calibrate_teacher.data.preprocess import ModelLayer, PreprocessConfig, ResolvedPreprocess, resolve_preprocess
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    from calibrate_teacher.teachers.base import Teacher

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "ArraySource",
    "Batch",
    "DataSource",
    "ImageFolderDataset",
    "ImageFolderSource",
    "IterableSource",
    "PreprocessConfig",
    "ResolvedPreprocess",
    "as_source",
    "open_data",
    "read_class_list",
    "resolve_preprocess",
]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def open_data(
    path: str | os.PathLike[str],
    *,
    preprocess: str | os.PathLike[str] | PreprocessConfig | None = None,
    overrides: Mapping[str, object] | None = None,
    model_layers: Sequence[ModelLayer] = (),
    teacher: Teacher | None = None,
    classes: Sequence[str] | str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
) -> ImageFolderSource | ArraySource:
    """Open an image folder or an array file as a data source for ``teacher``.

    Args:
        path: A folder in the ImageFolder layout, or a ``.npz`` / ``.safetensors`` / ``.npy``
            file of preprocessed ``inputs`` and ``labels`` (or, without ``inputs``, one array
            per named input: ``input_ids``, ``attention_mask``...; batches are then mappings).
        preprocess: Image folders only: a preprocess JSON file or a config; its keys win over
            ``model_layers`` and the teacher's input shape.
        overrides: Image folders only: single preprocessing keys that win (CLI flags); keys
            whose value is None are ignored.
        model_layers: Image folders only: the preprocessing the teacher's own files give
            (``teachers._preprocessing.find_model_preprocessing(teacher.path)``: its metadata,
            then its sidecar), lowest first. This module never looks beside the model itself.
        teacher: The teacher the data is for: gives the input shape (and its name in
            messages), and the number of classes the data must match.
        classes: Class names in label order, or a text file of them (one per line); by
            default ``classes.txt`` in the folder, else the sorted subfolder names.
        skip_bad: Skip unreadable images (listed in ``source.skipped``) instead of failing.

    Returns:
        The source; it satisfies :class:`DataSource` and also has ``description`` (for
        reports) and ``skipped``. For an image folder, ``description["preprocess_from"]``
        names where each preprocessing key came from (``defaults`` included) and
        ``description["preprocess_warnings"]`` lists one-line warnings (keys taken from the
        defaults, with the fix) for stderr.

    Raises:
        InputError: the path is missing or holds the wrong thing, or the data does not fit
            the teacher (input shape, class count).
        InvalidValueError: preprocessing options given for an array file (``model_layers``
            are ignored there: arrays are fed as stored).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    class_names, classes_origin = _class_list(classes)
    source: ImageFolderSource | ArraySource
    if p.is_dir():
        resolved = resolve_preprocess(
            preprocess=preprocess,
            overrides=overrides,
            model_layers=model_layers,
            model_path=teacher.path if teacher is not None else None,
            input_spec=teacher.input_spec if teacher is not None else None,
        )
        if teacher is not None:
            _check_shape(
                p,
                teacher,
                resolved.config.input_size,
                fix=f"set input_size in the preprocessing (now from {resolved.origin}) to the model's",
            )
        source = ImageFolderSource(
            p,
            config=resolved.config,
            config_origin=resolved.origin,
            class_names=class_names,
            class_names_origin=classes_origin,
            skip_bad=skip_bad,
        )
        source.description["preprocess_warnings"] = list(resolved.warnings)
    else:
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        if preprocess is not None or given:
            raise InvalidValueError(
                f"{p}: preprocessing options apply to image folders only; "
                "array files are fed to the teacher as stored"
            )
        spec = teacher.input_spec if teacher is not None else None
        float_dtype = spec.dtype if spec is not None and spec.dtype in _FLOAT_DTYPES else None
        source = ArraySource(p, float_dtype=float_dtype, class_names=class_names)
        if teacher is not None and source.named:
            # Named inputs: the teacher's input is checked against the field of its name (the
            # teacher itself refuses a missing one, naming both, when it runs).
            name = spec.name if spec is not None else None
            if name is not None and name in source.input_shapes:
                _check_shape(p, teacher, source.input_shapes[name], fix=f"store {name} as the model takes it")
        elif teacher is not None:
            _check_shape(p, teacher, source.input_shape, fix="store inputs the model accepts")
            top = int(source.labels.max())
            if top >= teacher.num_classes:
                raise InputError(
                    f"{p}: labels go up to {top} but {teacher.path.name} outputs "
                    f"{teacher.num_classes} logits; the labels must be indices of its outputs"
                )
    if teacher is not None and source.num_classes is not None:
        _check_classes(p, teacher, source.num_classes, source.description.get("classes_from"))
    return source


def as_source(
    data: DataSource | Iterable[object],
    *,
    classes: Sequence[str] | str | os.PathLike[str] | None = None,
) -> DataSource:
    """A data source as it is, or an iterable of batches (a DataLoader) as an IterableSource.

    Args:
        data: A :class:`DataSource`, or an iterable yielding ``(inputs, labels)`` pairs or
            mappings with a ``labels`` key (see :mod:`calibrate_teacher.data.iterable`).
        classes: Iterables only: class names in label order, or a text file of them.

    Returns:
        The source.

    Raises:
        InvalidValueError: ``data`` is a path (use :func:`open_data`), or not iterable;
            ``classes`` given for a source that is already open.
        InputError: the class list file is missing or invalid.
    """
    if isinstance(data, DataSource):
        if classes is not None:
            raise InvalidValueError(f"classes: {data.path} is already open; give classes when opening it")
        return data
    if isinstance(data, str | os.PathLike):
        raise InvalidValueError(f"data {str(data)!r}: a path; open it with open_data")
    class_names, _ = _class_list(classes)
    return IterableSource(data, class_names=class_names)


def _class_list(
    classes: Sequence[str] | str | os.PathLike[str] | None,
) -> tuple[tuple[str, ...] | None, str]:
    if classes is None:
        return None, ""
    if isinstance(classes, str | os.PathLike):
        file = Path(classes)
        if not file.is_file():
            raise InputError(
                f"{file}: no such class list; give a text file with one class per line"
            )
        return read_class_list(file), str(file)
    return tuple(str(c) for c in classes), "the given class list"


def _shape_text(dims: Sequence[int | None]) -> str:
    inner = ", ".join("?" if d is None else str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def _check_shape(p: Path, teacher: Teacher, got: Sequence[int], *, fix: str) -> None:
    spec = teacher.input_spec
    if spec is None or not spec.shape:
        return
    expected = tuple(spec.shape[1:])
    fits = len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got, strict=False)
    )
    if not fits:
        raise InputError(
            f"{p}: input shape does not fit {teacher.path.name}: expected {_shape_text(expected)} "
            f"got {_shape_text(tuple(got))} per sample; {fix}"
        )


def _check_classes(p: Path, teacher: Teacher, count: int, origin: object) -> None:
    if count == teacher.num_classes:
        return
    where = f" (from {origin})" if origin else ""
    name = p.name or str(p)
    raise InputError(
        f"{name}/ has {count} classes{where} but {teacher.path.name} outputs "
        f"{teacher.num_classes} logits; list the teacher's classes in output order in "
        f"{p / 'classes.txt'} or pass --classes FILE"
        if p.is_dir()
        else f"{p}: {count} class names but {teacher.path.name} outputs {teacher.num_classes} "
        "logits; give one name per output"
    )
