"""Hugging Face model directories: checked for safety, then loaded with transformers' ``from_pretrained``.

A directory is a Hugging Face model (:func:`is_hf_directory`) when it holds a ``config.json`` that
transformers wrote (a JSON object with ``model_type`` or ``architectures``; timm's Hub
``config.json`` has ``architecture`` and is not one). :func:`open_pretrained` loads it, after
:func:`check_directory` has made sure that loading can neither run code nor read files the user
did not hand over:

* **Weights** are ``model.safetensors``, or shards named by ``model.safetensors.index.json``.
  Without them, ``pytorch_model.bin`` (or its index) is read by transformers with
  ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only: a pickle
  payload that would call a function is refused by torch, never run. Nothing else is read
  (``from_pretrained`` gets ``use_safetensors`` set to what was found, ``weights_only=True``).
* **Remote code**: a ``config.json`` with ``auto_map`` makes ``from_pretrained`` import Python
  modules from the directory. It is refused, *before* anything in the directory is imported,
  unless ``trust_remote_code=True`` (``--trust-remote-code``); even then the modules must be
  files in the directory (an ``auto_map`` entry naming another Hub repo, ``repo--module.Class``,
  is refused).
* **Nothing outside**: every entry of the directory, and every shard an index names, must
  resolve (symlinks followed) inside the directory. One layout is allowed to point out: a Hub
  cache snapshot (``.../snapshots/<rev>/``), whose files link into the same repo's ``blobs/``.
* A PEFT adapter (``adapter_config.json``) is refused: transformers would load a base model
  named inside it.
* ``local_files_only=True`` always: nothing is downloaded.

Which Auto class loads it comes from ``config.architectures`` (see :func:`auto_class_for`). The
dtype comes from the config (``dtype``, or ``torch_dtype`` in older files; float32 when it
names none, and the notes say so). Weights the checkpoint lacks (transformers would initialise
them at random, with a warning) are refused: a randomly initialised head is no teacher.

The safety checks live in :mod:`~calibrate_teacher.teachers._hf_layout` (re-exported here). The
classification teacher over a loaded model (:class:`~calibrate_teacher.teachers._hf_teacher.HFTeacher`)
lives in ``_hf_teacher``; baking a directory into a directory in ``_hf_bake``.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.errors import MissingDependencyError, TeacherError
from calibrate_teacher.teachers._hf_layout import (
    HfLayout,
    allowed_roots,
    check_directory,
    is_hf_directory,
    read_config,
    resolve_inside,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "HFTask",
    "HfLayout",
    "allowed_roots",
    "auto_class_for",
    "check_directory",
    "config_dtype",
    "is_hf_directory",
    "open_pretrained",
    "quiet_transformers",
    "read_config",
    "resolve_inside",
]

#: What a model's head predicts, as far as we load it.
HFTask = Literal["sequence", "image", "causal_lm", "token"]
INSTALL_HINT = "pip install 'calibrate-teacher[hf]'"
#: The Auto class for each task, and the transformers mapping that lists its architectures.
AUTO_CLASSES: dict[HFTask, tuple[str, str]] = {
    "sequence": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "image": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "token": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
}
# Architecture name endings, for architectures no transformers mapping lists (remote code).
_SUFFIXES: tuple[tuple[str, HFTask], ...] = (
    ("ForSequenceClassification", "sequence"),
    ("ForImageClassification", "image"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForTokenClassification", "token"),
)
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def auto_class_for(config: Mapping[str, object], *, where: Path) -> tuple[str, HFTask]:
    """The Auto class (e.g. ``AutoModelForSequenceClassification``) and task of ``architectures[0]``.

    The architecture is looked up in transformers' own task mappings, then (remote code) in
    the config's ``auto_map``, then by its name's ending (``...ForSequenceClassification``...).

    Raises:
        TeacherError: no ``architectures`` in the config, or one of no task we load.
    """
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise TeacherError(
            f"{where / 'config.json'}: names no architectures, so the head (sequence or image "
            "classification, causal LM) is unknown; save the task model (e.g. "
            "...ForSequenceClassification) with save_pretrained"
        )
    arch = archs[0]
    import_transformers()
    from transformers.models.auto import modeling_auto

    for task, (auto, mapping) in AUTO_CLASSES.items():
        names = getattr(modeling_auto, mapping, {})
        for value in names.values():
            if arch == value or (isinstance(value, tuple | list) and arch in value):
                return auto, task
    auto_map = config.get("auto_map")
    if isinstance(auto_map, Mapping):
        for task, (auto, _) in AUTO_CLASSES.items():
            ref = auto_map.get(auto)
            if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch:
                return auto, task
    for ending, task in _SUFFIXES:
        if arch.endswith(ending):
            return AUTO_CLASSES[task][0], task
    loaded = ", ".join(a for a, _ in AUTO_CLASSES.values())
    raise TeacherError(
        f"{where / 'config.json'}: architecture {arch!r} is no head we load ({loaded}); save "
        "a sequence or image classification model, or a causal LM"
    )


def config_dtype(config: Mapping[str, object]) -> tuple[str, str | None]:
    """(dtype name, the config key it came from or None when defaulted to float32).

    Raises:
        TeacherError: the config names a dtype other than float16/bfloat16/float32/float64.
    """
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is None or value == "auto":
            continue
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise TeacherError(f"config.json: {key}={value!r} is not one of {', '.join(_DTYPES)}")
        return name, key
    return "float32", None


def import_transformers() -> object:
    """The transformers module, or :class:`MissingDependencyError` with the install hint."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"Hugging Face model directories need transformers; {INSTALL_HINT}") from exc
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Turn transformers' progress bars off for the block (the library never prints)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def open_pretrained(
    path: Path,
    *,
    auto_class: str | None = None,
    trust_remote_code: bool = False,
    device: str = "auto",
) -> tuple[PreTrainedModel, list[str]]:
    """Load a model directory with transformers, safely, in eval mode on ``device``.

    Args:
        path: The directory (``save_pretrained`` layout).
        auto_class: The transformers Auto class to load with, e.g. ``"AutoModelForCausalLM"``;
            None picks it from ``config.architectures`` (see :func:`auto_class_for`).
        trust_remote_code: Allow ``auto_map`` code in the directory (see the module docstring).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        ``(model, notes)``: the model in ``eval()`` mode on the device, and one-line notes
        saying what was chosen (Auto class, dtype and where it came from, weights format).

    Raises:
        MissingDependencyError: transformers is not installed.
        InputError, TeacherError: see :func:`check_directory`; also weights that do not fit
            the architecture, or that the checkpoint lacks.
        InvalidValueError: a malformed ``device``, or CUDA asked for but absent.
    """
    import torch

    from calibrate_teacher._device import resolve_device

    folder = Path(path)
    target = resolve_device(device)
    layout = check_directory(folder, trust_remote_code=trust_remote_code)
    transformers = import_transformers()
    chosen = auto_class if auto_class is not None else auto_class_for(layout.config, where=folder)[0]
    loader = getattr(transformers, chosen, None)
    if loader is None or not hasattr(loader, "from_pretrained"):
        raise TeacherError(f"{folder}: transformers has no {chosen!r} to load the model with")
    dtype, key = config_dtype(layout.config)
    try:
        with quiet_transformers():
            model, info = loader.from_pretrained(
                str(folder),
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                dtype=getattr(torch, dtype),
                use_safetensors=layout.safetensors,
                weights_only=True,
                output_loading_info=True,
            )
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) refuses a pickle that would call anything: nothing ran.
        raise TeacherError(
            f"{folder}: {layout.weights[0].name} holds more than tensors (torch.load "
            f"weights_only=True refused it: {_first_line(exc)}); nothing in it was run; "
            "re-save the model as safetensors"
        ) from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise TeacherError(f"{folder}: transformers could not load the model ({_first_line(exc)})") from exc
    missing = list(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        names = ", ".join(str(k if isinstance(k, str) else k[0]) for k in (missing + mismatched)[:4])
        raise TeacherError(
            f"{folder}: the checkpoint lacks (or misfits) {len(missing) + len(mismatched)} weight(s) "
            f"of {type(model).__name__} ({names}...), which transformers would initialise at random; "
            "save the trained task model itself with save_pretrained"
        )
    model.eval()
    model.to(target)
    origin = f"config.json {key}" if key else "config.json names none: float32"
    notes = [
        *layout.notes,
        f"{folder.name}: loaded with transformers {chosen} as {type(model).__name__}, dtype "
        f"{dtype} ({origin}), on {target}",
    ]
    unexpected = list(info.get("unexpected_keys") or ())
    if unexpected:
        notes.append(
            f"{folder.name}: {len(unexpected)} checkpoint weight(s) unused by {type(model).__name__} "
            f"({', '.join(map(str, unexpected[:3]))}...)"
        )
    if layout.remote_code:
        notes.append(f"{folder.name}: ran the directory's own code ({', '.join(p.name for p in layout.remote_code)})")
    return model, notes


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 if none)."""
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
