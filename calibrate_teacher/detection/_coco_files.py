"""Where a COCO dataset's files are: the annotation json, the image folder, and safe image paths."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from calibrate_teacher.errors import InputError

__all__ = ["find_annotations", "find_images", "safe_path"]


def _visible_json(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() == ".json" and not p.name.startswith(".") and p.is_file()
    )


def find_annotations(folder: Path) -> Path:
    found = _visible_json(folder) + _visible_json(folder / "annotations")
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(
            f"{folder}: no annotation file (*.json) in the folder or its annotations/; pass --data FILE.json"
        )
    listed = ", ".join(str(p) for p in found)
    raise InputError(f"{folder}: several annotation files ({listed}); pass the one to use as --data FILE.json")


def safe_path(root: Path, real_root: str, file_name: object) -> tuple[str | None, str]:
    """(the relative path, "") when ``file_name`` may be read inside ``root``, else (None, why)."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None, f"file_name {file_name!r} is not a file name"
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(file_name) or (pure.parts and ":" in pure.parts[0]):
        return None, f"file_name {file_name!r} is an absolute path; names are read inside the image folder"
    if ".." in pure.parts:
        return None, f"file_name {file_name!r} leads out of the image folder (..)"
    real = os.path.realpath(root / pure)
    try:
        inside = os.path.commonpath([real, real_root]) == real_root
    except ValueError:
        inside = False
    if not inside:
        return None, f"file_name {file_name!r} is a symlink pointing outside the image folder (to {real})"
    if not os.path.exists(real):
        return None, f"{root / pure}: no such image file"
    return pure.as_posix(), ""


def find_images(bases: list[Path], first: str, explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_dir():
            raise InputError(f"{explicit}: no such image folder; pass --images DIR")
        return explicit
    candidates: list[Path] = []
    for base in bases:
        dirs = [base]
        for parent in (base, base / "images"):
            if parent.is_dir():
                dirs += sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        for d in dirs:
            real_root = os.path.realpath(d)
            if d not in candidates and safe_path(d, real_root, first)[0] is not None:
                candidates.append(d)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        looked = ", ".join(str(b) for b in bases)
        raise InputError(f"no image folder holds {first!r} (looked in and below {looked}); pass --images DIR")
    listed = ", ".join(str(c) for c in candidates)
    raise InputError(f"several folders hold {first!r} ({listed}); pass the image folder as --images DIR")
