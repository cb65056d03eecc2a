"""A Hugging Face model directory's files, checked before anything reads them (see ``_hf``).

:func:`check_directory` makes sure loading the directory can neither run code nor read files
the user did not hand over: weights are safetensors (else ``pytorch_model.bin``, read only with
``torch.load(weights_only=True)``), ``auto_map`` code is refused unless trusted and must live in
the directory, every entry and every shard an index names must resolve inside the directory
(a Hub cache snapshot may link into its repo's ``blobs/``), and a PEFT adapter is refused.
Nothing here imports transformers or torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from calibrate_teacher.errors import InputError, TeacherError

__all__ = ["HfLayout", "allowed_roots", "check_directory", "is_hf_directory", "read_config", "resolve_inside"]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class HfLayout:
    """What :func:`check_directory` found in a model directory.

    Attributes:
        root: The directory, resolved.
        config: The parsed ``config.json``.
        weights: The weight files transformers will read (resolved), shards included.
        safetensors: True when the weights are safetensors (else ``pytorch_model.bin``).
        remote_code: The Python files ``auto_map`` names (empty without remote code).
        notes: One-line remarks (weights read from a pickle format, a Hub cache snapshot).
        roots: The folders its files may resolve into: the directory (and a Hub cache
            snapshot's ``blobs/``).
    """

    root: Path
    config: Mapping[str, object]
    weights: tuple[Path, ...]
    safetensors: bool
    remote_code: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=())
    roots: tuple[Path, ...] = ()


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder whose ``config.json`` transformers wrote.

    Only the JSON is read (nothing is imported): it must be an object with ``model_type`` or
    ``architectures``. Weights and safety are checked when the directory is opened.
    """
    folder = Path(path)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def read_config(folder: Path) -> dict[str, object]:
    """The parsed ``config.json`` of a model directory.

    Raises:
        InputError: missing, unreadable, or not a JSON object.
    """
    file = folder / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{folder}: no config.json; save the model with save_pretrained") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: cannot read it as JSON ({exc}); re-save the model with save_pretrained") from exc
    if not isinstance(data, dict):
        raise InputError(f"{file}: not a JSON object; re-save the model with save_pretrained")
    return data


def check_directory(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> HfLayout:
    """Check that loading the directory reads only its own files and runs no code unasked.

    Args:
        path: The model directory.
        trust_remote_code: Allow ``auto_map`` (the modules must be files in the directory).

    Returns:
        An :class:`HfLayout`.

    Raises:
        InputError: not a directory, no ``config.json``, no weights, an index that is not
            JSON, an entry or shard that resolves outside the directory, a PEFT adapter.
        TeacherError: ``auto_map`` without ``trust_remote_code``, or naming code not in the
            directory.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory; a Hugging Face model is a save_pretrained folder")
    root = folder.resolve()
    notes: list[str] = []
    allowed = allowed_roots(root)
    if len(allowed) > 1:
        notes.append(f"{root}: a Hub cache snapshot; its files link into {allowed[1]}")
    for entry in sorted(folder.iterdir()):
        resolve_inside(entry, allowed, root)
    config = read_config(folder)
    if (folder / "adapter_config.json").exists():
        raise InputError(
            f"{folder}: holds a PEFT adapter (adapter_config.json), which loads a base model named "
            "inside it; merge it (merge_and_unload) and save_pretrained the merged model"
        )
    remote = _remote_code(folder, root, config, trust_remote_code=trust_remote_code)
    weights, safe = _weights(folder, root, allowed)
    if not safe:
        notes.append(
            f"{folder.name}: weights read from {weights[0].name} with torch.load(weights_only=True) "
            "(tensors only, no code runs); save_pretrained writes model.safetensors"
        )
    return HfLayout(root, config, weights, safe, remote, tuple(notes), allowed)


def allowed_roots(root: Path) -> tuple[Path, ...]:
    """The folders a directory's files may resolve into: itself, and a Hub snapshot's ``blobs/``."""
    # A Hub cache snapshot links each file into <repo>/blobs/: still the same repo's files.
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        return root, blobs.resolve()
    return (root,)


def resolve_inside(entry: Path, allowed: tuple[Path, ...], root: Path) -> Path:
    """``entry`` resolved (symlinks followed); :class:`InputError` unless inside ``allowed``."""
    real = entry.resolve()
    if not any(real == a or real.is_relative_to(a) for a in allowed):
        raise InputError(
            f"{entry}: resolves to {real}, outside the model directory {root}; copy the file "
            "into the directory instead of linking (or naming) it"
        )
    return real


def _remote_code(
    folder: Path, root: Path, config: Mapping[str, object], *, trust_remote_code: bool
) -> tuple[Path, ...]:
    """The local modules ``auto_map`` names; refused unless trusted (checked before any import)."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return ()
    if not trust_remote_code:
        raise TeacherError(
            f"{folder / 'config.json'}: auto_map names custom model code that from_pretrained would "
            "import and run; refused by default: read the code, then pass --trust-remote-code "
            "(trust_remote_code=True) to allow it"
        )
    refs = auto_map.values() if isinstance(auto_map, Mapping) else [auto_map]
    files: list[Path] = []
    for ref in refs:
        for item in ref if isinstance(ref, list | tuple) else [ref]:
            if item is None:
                continue
            text = str(item)
            if "--" in text:
                raise TeacherError(
                    f"{folder / 'config.json'}: auto_map entry {text!r} names code in another Hub repo; "
                    "only code inside the model directory is run: copy it in and edit auto_map"
                )
            module = text.rsplit(".", 1)[0]
            file = folder / (module.replace(".", "/") + ".py")
            if not file.is_file():
                raise TeacherError(
                    f"{folder}: auto_map entry {text!r} needs {file.name}, which is not in the directory"
                )
            files.append(resolve_inside(file, (root,), root))
    return tuple(files)


def _weights(folder: Path, root: Path, allowed: tuple[Path, ...]) -> tuple[tuple[Path, ...], bool]:
    for single, index, safe in ((SAFETENSORS, SAFETENSORS_INDEX, True), (PICKLE_WEIGHTS, PICKLE_INDEX, False)):
        if (folder / single).is_file():
            return (resolve_inside(folder / single, allowed, root),), safe
        if (folder / index).is_file():
            return _shards(folder, folder / index, allowed, root), safe
    raise InputError(
        f"{folder}: no model weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, or {PICKLE_WEIGHTS}); "
        "save the model with save_pretrained"
    )


def _shards(folder: Path, index: Path, allowed: tuple[Path, ...], root: Path) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index}: cannot read the shard index ({exc}); re-save the model") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: no weight_map; re-save the model with save_pretrained")
    shards: list[Path] = []
    for name in sorted({str(v) for v in weight_map.values()}):
        shard = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(
                f"{index}: names the shard {name!r}, outside the model directory {root}; shards "
                "must be files in the directory"
            )
        real = resolve_inside(shard, allowed, root)
        if not shard.is_file():
            raise InputError(f"{index}: names the shard {name!r}, which is not in {folder}")
        shards.append(real)
    return tuple(shards)
