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
    from calibrate_teacher.tokens.teacher import TokenTeacher

__all__ = ["DataSpec", "Device", "TeacherSpec", "TextOptions"]

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
        trust_remote_code: Hugging Face directories: let the code the directory ships
            (``auto_map``) run. Off by default: such a directory is refused.
        inputs: Model input name -> batch field, for inputs whose names differ from the data's
            fields (``{"input_ids": "ids"}``; the CLI's ``--input NAME=FIELD``).
    """

    source: object
    device: Device = "auto"
    output: str | int | None = None
    arch: str | None = None
    arch_kwargs: Mapping[str, object] | str | None = None
    head: str | None = None
    trust_remote_code: bool = False
    inputs: Mapping[str, str] | None = None

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
                self.path, device=self.device, output=output, arch=self.arch, arch_kwargs=self.arch_kwargs,
                trust_remote_code=self.trust_remote_code,
            )
        model = as_teacher(self.source, output=self.output)  # type: ignore[arg-type]
        device = self.device
        if device != "auto" and device != model.device and not model.device.startswith(f"{device}:"):
            raise InvalidValueError(
                f"device {device!r}: {model.path} is on {model.device} and is never moved; move it "
                "yourself (module.to(device)) or leave device='auto'"
            )
        return model

    def load_tokens(self) -> TokenTeacher:
        """Load a token-level teacher: a causal LM or a token classifier.

        A Hugging Face directory, an ONNX file or an in-memory model; see
        :func:`~calibrate_teacher.tokens.teacher.load_token_teacher`.
        """
        from calibrate_teacher.tokens.teacher import load_token_teacher

        if self.arch is not None or self.head is not None or self.output is not None:
            given = [n for n, v in (("arch", self.arch), ("head", self.head), ("output", self.output)) if v]
            raise InvalidValueError(f"{', '.join(given)}: do not apply to token-level (language-model) teachers")
        return load_token_teacher(
            self.path if self.path is not None else self.source, device=self.device,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass(frozen=True)
class TextOptions:
    """How to read text data (``.jsonl``, ``.csv``, ``.parquet``, a ``save_to_disk`` dataset).

    Attributes:
        text_field: The field holding the text.
        text_pair_field: The field holding the second text of a pair, if any.
        label_field: The field holding the label: an integer id or a class name (mapped
            through the teacher's ``label2id`` or the class list).
        id_field: A field of unique sample ids used as keys (default: the row index).
        tokenizer: The tokenizer directory (default: the teacher's, for a Hugging Face
            directory).
        max_length: Truncate to this many tokens (default: the tokenizer's
            ``model_max_length``; the report says so).
        sort_by_length: Batch texts of similar length together; results keep the data's order.
        prompt_field: Language models: the prompt field of prompt/completion rows.
        completion_field: Language models: the completion field.
        messages_field: Language models: the chat messages field (rendered with the
            tokenizer's chat template).
        completion_only: Language models: score only completion tokens / assistant turns.
    """

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    id_field: str | None = None
    tokenizer: PathLike | None = None
    max_length: int | None = None
    sort_by_length: bool = False
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    completion_only: bool = False

    def __post_init__(self) -> None:
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise InvalidValueError(f"max_length {self.max_length!r}: must be an integer >= 1")
        for name in ("text_field", "label_field", "prompt_field", "completion_field", "messages_field"):
            if not getattr(self, name):
                raise InvalidValueError(f"{name}: must name a field, got an empty string")


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
        text: Text data: which fields to read and how to tokenise (default
            :class:`TextOptions`).
    """

    source: object
    preprocess: PathLike | PreprocessConfig | None = None
    overrides: Mapping[str, object] | None = None
    classes: Sequence[str] | PathLike | None = None
    skip_bad: bool = False
    batch_size: int = 64
    workers: int = 0
    text: TextOptions | None = None

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

    def open(self, teacher: Teacher, *, trust_remote_code: bool = False) -> DataSource:
        """Open the data as a source of batches for ``teacher``.

        Args:
            teacher: The loaded teacher (its input shape, classes and, for text, tokenizer).
            trust_remote_code: Text data: let a tokenizer that ships code load
                (:attr:`TeacherSpec.trust_remote_code`).
        """
        from calibrate_teacher.data import as_source, open_data
        from calibrate_teacher.data._records import is_record_data

        if self.path is None:
            return as_source(self.source, classes=self.classes)  # type: ignore[arg-type]
        if is_record_data(self.path):
            return self._open_text(teacher, trust_remote_code=trust_remote_code)
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

    def _open_text(self, teacher: Teacher, *, trust_remote_code: bool) -> DataSource:
        """Rows of text, tokenised with ``--tokenizer`` or the teacher directory's own tokenizer."""
        from calibrate_teacher.data import read_class_list
        from calibrate_teacher.data.text import open_text
        from calibrate_teacher.teachers import find_model_classes

        assert self.path is not None
        text = self.text or TextOptions()
        tokenizer = text.tokenizer
        if tokenizer is None:
            if not (teacher.format != "module" and teacher.path.is_dir()):
                raise InvalidValueError(
                    f"{self.path}: text data needs a tokenizer; {teacher.path.name} is not a Hugging Face "
                    "directory with one, so give --tokenizer DIR (tokenizer=... in TextOptions)"
                )
            tokenizer = teacher.path
        names: Sequence[str] | None
        if self.classes is None:
            carried = find_model_classes(teacher.path) if teacher.format != "module" else None
            names, origin = (carried[0], carried[1]) if carried is not None else (None, "none")
        elif isinstance(self.classes, str | os.PathLike):
            names, origin = read_class_list(self.classes), str(self.classes)
        else:
            names, origin = tuple(self.classes), "the given class list"
        return open_text(
            self.path, tokenizer=tokenizer, text_field=text.text_field, text_pair_field=text.text_pair_field,
            label_field=text.label_field, id_field=text.id_field, max_length=text.max_length,
            class_names=names, class_names_origin=origin, sort_by_length=text.sort_by_length,
            trust_remote_code=trust_remote_code,
        )

    def open_tokens(self, teacher: TokenTeacher, *, trust_remote_code: bool = False) -> DataSource:
        """Open the data as token sequences for a token-level ``teacher``.

        Text rows (plain text, prompt/completion, chat messages, or words + tags for a token
        classifier) are tokenised with ``text.tokenizer`` or the teacher directory's own
        tokenizer; array files hold pre-tokenised ``input_ids``, ``attention_mask`` and
        ``labels`` ``[N, S]``; an iterable's batches are used as they come.
        """
        from calibrate_teacher.data import as_source, open_data
        from calibrate_teacher.data._records import is_record_data

        if self.path is None:
            return as_source(self.source)  # type: ignore[arg-type]
        if not is_record_data(self.path):
            return open_data(self.path)
        from calibrate_teacher.data.tokens import open_token_text

        text = self.text or TextOptions()
        tokenizer = text.tokenizer
        if tokenizer is None:
            if not teacher.path.is_dir():
                raise InvalidValueError(
                    f"{self.path}: text data needs a tokenizer; {teacher.path.name} is not a Hugging Face "
                    "directory with one, so give --tokenizer DIR (tokenizer=... in TextOptions)"
                )
            tokenizer = teacher.path
        names = teacher.class_names if teacher.task == "token-classification" else None
        if self.classes is not None:
            from calibrate_teacher.data import read_class_list

            listed = self.classes
            names = read_class_list(listed) if isinstance(listed, str | os.PathLike) else tuple(listed)
        return open_token_text(
            self.path, tokenizer=tokenizer, task=teacher.task, text_field=text.text_field,
            prompt_field=text.prompt_field, completion_field=text.completion_field,
            messages_field=text.messages_field, completion_only=text.completion_only, id_field=text.id_field,
            max_length=text.max_length, class_names=names, sort_by_length=text.sort_by_length,
            trust_remote_code=trust_remote_code,
        )
