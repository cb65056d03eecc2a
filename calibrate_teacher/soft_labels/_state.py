"""What an export finds in ``--out`` and what it does about it: new, resume, restart or done.

A run's identity is its :func:`~calibrate_teacher.soft_labels._format.run_id` (teacher, data,
T, layout). An unfinished cache of the same identity is resumed; a complete one is left as it
is (a retry succeeds); any other cache is refused with what differs. Data paths compare
resolved, so ``train/``, ``./x/../train`` and ``/abs/train`` are the same data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from calibrate_teacher.errors import CacheError, CalibrateTeacherError, InputError, OutputExistsError
from calibrate_teacher.soft_labels._format import KEYS_NAME, MANIFEST_NAME, CacheManifest, read_manifest, run_id
from calibrate_teacher.soft_labels._output import LOCK_NAME
from calibrate_teacher.soft_labels._shards import fsync_dir

__all__ = ["existing_state", "is_ours", "normalise_source", "refusal", "same_run", "tidy"]

#: The keys of a data source's description that hold paths (compared resolved).
PATH_KEYS = ("path", "classes_from")


def normalise_source(source: object) -> object:
    """Return a data source's description with its paths resolved (absolute, no ``..``, no links).

    ``train/``, ``./train`` and ``/abs/train`` then compare equal; a relative path is resolved
    against the current directory. Other values are kept as they are.

    >>> import os
    >>> normalise_source({"kind": "arrays", "path": "x/../x.npz"})["path"] == os.path.realpath("x.npz")
    True
    """
    if not isinstance(source, Mapping):
        return source
    resolved = dict(source)
    for key in PATH_KEYS:
        value = resolved.get(key)
        # classes_from also holds phrases ("sorted subfolder names"): resolve only real paths
        if isinstance(value, str) and value and (key == "path" or os.path.exists(value)):
            resolved[key] = str(Path(value).resolve())
    return resolved


def same_run(old: CacheManifest, new: CacheManifest) -> bool:
    """True when two manifests describe the same bytes: equal run ids, or equal once paths resolve."""
    if old.run_id == new.run_id:
        return True

    def identity(m: CacheManifest) -> str:
        data = {"source": normalise_source(m.data.get("source")), "num_samples": m.num_samples}
        return run_id(m.teacher, data, m.temperature, m.layout)

    return identity(old) == identity(new)


def refusal(folder: Path, old: CacheManifest, difference: str) -> CalibrateTeacherError:
    """The error for a request that differs (in ``difference``) from the cache already in ``folder``."""
    if old.complete:
        return OutputExistsError(
            f"{folder}: already holds a complete soft-label cache of a different {difference}; "
            "pass --overwrite to replace it"
        )
    return CacheError(
        f"{folder}: holds an unfinished cache of a different {difference}; "
        "it is never extended: pass --no-resume to start over, or choose another --out"
    )


def existing_state(
    folder: Path, manifest: CacheManifest, *, overwrite: bool, resume: bool
) -> tuple[str, CacheManifest]:
    """Return what to do in ``folder`` and the manifest to do it with; raise when it must not be touched.

    "new", "restart" (clear the folder first), "resume" (with the unfinished run's identity,
    which may spell its data paths differently) or "done" (with the complete manifest).
    """
    if not (folder / MANIFEST_NAME).is_file():
        foreign = [p.name for p in folder.iterdir() if not is_ours(p.name)]
        if foreign:
            raise InputError(
                f"{folder}: folder is not empty and holds no soft-label cache ({MANIFEST_NAME}); "
                "choose a new or empty --out"
            )
        return "new", manifest
    if overwrite:
        return "restart", manifest  # even over a damaged manifest: the user asked to replace it
    old = read_manifest(folder)
    same = same_run(old, manifest)
    if old.complete:
        if not same:
            raise refusal(folder, old, difference(old, manifest))
        _check_present(folder, old)
        return "done", old
    if not resume:
        return "restart", manifest
    if not same:
        raise refusal(folder, old, difference(old, manifest))
    return "resume", replace(manifest, teacher=old.teacher, data=old.data, run_id=old.run_id)


def is_ours(name: str) -> bool:
    """The lock file, receipts and temporary files a killed export may leave in a folder."""
    if name == LOCK_NAME:
        return True
    return name.endswith(".tmp") and name.startswith(
        (".shard-", "..shard-", f".{MANIFEST_NAME}.", f".{KEYS_NAME}.")
    )


def _check_present(folder: Path, manifest: CacheManifest) -> None:
    """Refuse to call a complete cache done when one of its files is missing or resized (cheap)."""
    for info in manifest.shards:
        path = folder / info.file
        if not path.is_file() or path.stat().st_size != info.bytes:
            raise CacheError(
                f"{path}: missing or not the size manifest.json records; run `calibrate-teacher "
                "inspect --verify`, or pass --overwrite to export the cache again"
            )
    if not (folder / KEYS_NAME).is_file():
        raise CacheError(f"{folder / KEYS_NAME}: missing; pass --overwrite to export the cache again")


def tidy(folder: Path) -> None:
    """Remove what a run killed after completing the manifest leaves: receipts, temporary files."""
    for path in folder.iterdir():
        receipt = path.name.startswith(".shard-") and path.name.endswith(".receipt.json")
        if receipt or (is_ours(path.name) and path.name != LOCK_NAME):
            path.unlink(missing_ok=True)
    fsync_dir(folder)


def difference(old: CacheManifest, new: CacheManifest) -> str:
    """Name what differs between two runs' identities, for the refusal message."""
    if old.teacher != new.teacher:
        old_sha, new_sha = old.teacher.get("sha256"), new.teacher.get("sha256")
        return f"teacher (sha256 {old_sha!s:.12} vs {new_sha!s:.12})"
    if old.num_samples != new.num_samples:
        return f"data (N = {old.num_samples} vs {new.num_samples})"
    old_source, new_source = normalise_source(old.data.get("source")), normalise_source(new.data.get("source"))
    if old_source != new_source:
        if isinstance(old_source, dict) and isinstance(new_source, dict):
            for key in sorted(set(old_source) | set(new_source)):
                if old_source.get(key) != new_source.get(key):
                    was, now = old_source.get(key), new_source.get(key)
                    return f"data source ({key}: {was!r:.60} vs {now!r:.60})"
        return "data source"
    if old.temperature != new.temperature:
        return f"temperature (T = {old.temperature} vs {new.temperature})"
    if old.layout != new.layout:
        return f"layout ({old.layout.to_json()} vs {new.layout.to_json()})"
    return "format or tool version"
