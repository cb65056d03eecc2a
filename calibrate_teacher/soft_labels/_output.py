"""The cache folder as an output: checked, created and locked before the teacher runs.

:func:`claim_output` makes sure ``--out`` can be written (creating it and a lock file in it),
then holds an advisory ``fcntl.flock`` on that lock file for the whole export, so that a second
export into the same folder fails at once with a clear message instead of racing the first.
Under torchrun only rank 0 takes the lock: all ranks of one run share it.

If the export then fails before any shard is finished, the claim puts the folder back as it
was: the manifest it wrote and the folders it created are removed. An export that finished
shards keeps them, so that a rerun resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from calibrate_teacher._distributed import DistributedContext
from calibrate_teacher.errors import CacheError, InputError, OutputError

__all__ = ["LOCK_NAME", "OutputClaim", "claim_output", "os_error_fix"]

LOCK_NAME = ".export.lock"
#: flock errors that mean "this file system cannot lock", not "someone holds the lock".
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
GO, DONE, FAILED = 1, 2, 3


def on_main_rank(context: DistributedContext, action: Callable[[], object], *, failed: str) -> None:
    """Run ``action`` on rank 0 and tell every rank whether it worked.

    Every rank calls this at the same point. Rank 0's own error propagates; the other ranks
    raise a :class:`CacheError` with ``failed`` instead of waiting for a step that never comes.
    """
    if context.is_main:
        try:
            action()
        except BaseException:
            context.share(FAILED)
            raise
        context.share(GO)
    elif context.share(0) == FAILED:
        raise CacheError(f"{failed}; see its error")


def os_error_fix(exc: OSError) -> str:
    """What to do about a failed write, by its errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or choose another --out)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable (or choose another --out)"
    return "check the disk (or choose another --out)"


@dataclass
class OutputClaim:
    """This process's hold on the cache folder (see :func:`claim_output`).

    Attributes:
        folder: The cache folder.
        context: This process's rank; only rank 0 holds the lock.
        created: The folders the claim created, outermost first (removed again on failure).
        wrote_manifest: The export wrote a fresh manifest (removed again if no shard finishes).
    """

    folder: Path
    context: DistributedContext
    created: list[Path] = field(default_factory=list)
    wrote_manifest: bool = False
    _fd: int | None = None

    def _acquire(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; choose another --out")
        self.created = _make_folders(folder)
        path = folder / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._remove_created()
                raise OutputError(
                    f"{folder}: cannot write in this folder ({exc.strerror}); {os_error_fix(exc)}"
                ) from None
            if not _lock(fd, folder, path):
                break
            # The holder may have removed the file between our open and our lock: lock the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        try:  # also proves that files can be written here, before any teacher runs
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            self._release(remove_folders=True)
            raise OutputError(
                f"{folder}: cannot write in this folder ({exc.strerror}); {os_error_fix(exc)}"
            ) from None

    def _release(self, *, remove_folders: bool) -> None:
        """Drop the lock file (while still holding it), then the lock; optionally our folders."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if remove_folders:
            self._remove_created()

    def _remove_created(self) -> None:
        for made in reversed(self.created):
            try:
                made.rmdir()  # only if empty: never anything but our own folders
            except OSError:
                break

    def _undo(self) -> None:
        """Put the folder back as it was, unless a shard was finished (then it stays resumable)."""
        from calibrate_teacher.soft_labels._format import MANIFEST_NAME

        folder = self.folder
        finished = any(folder.glob(".shard-*.receipt.json"))
        if self.wrote_manifest and not finished:
            with contextlib.suppress(OSError):
                (folder / MANIFEST_NAME).unlink(missing_ok=True)
                for unfinished in folder.glob("shard-*.safetensors"):  # ours: the run cleared the rest
                    unfinished.unlink()
        self._release(remove_folders=True)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and any missing parents; return the ones created, outermost first."""
    missing: list[Path] = []
    walk = folder.absolute()
    while not walk.exists() and walk != walk.parent:
        missing.append(walk)
        walk = walk.parent
    created: list[Path] = []
    for made in reversed(missing):
        try:
            os.mkdir(made)
        except FileExistsError:
            continue  # another process made it meanwhile: not ours to remove
        except OSError as exc:
            for undo in reversed(created):
                with contextlib.suppress(OSError):
                    undo.rmdir()
            raise OutputError(
                f"{folder}: cannot create this folder ({exc.strerror} at {made}); {os_error_fix(exc)}"
            ) from None
        created.append(made)
    return created


def _lock(fd: int, folder: Path, path: Path) -> bool:
    """Take the lock without waiting; False where the file system cannot lock at all."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        os.close(fd)
        raise CacheError(
            f"{folder}: is being written by another export ({holder}); wait for it to finish "
            "(rerunning then resumes or finds it complete), or choose another --out"
        ) from None
    except OSError as exc:
        if exc.errno in _NO_LOCKING:
            return False  # e.g. some network file systems: go on unlocked, as before
        os.close(fd)
        raise OutputError(f"{folder}: cannot lock {path.name} ({exc.strerror}); choose another --out") from None
    return True


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return "pid unknown"
    if not pid:
        return "pid unknown"
    return f"pid {pid}" if host in ("", socket.gethostname()) else f"pid {pid} on {host}"


@contextlib.contextmanager
def claim_output(out: str | os.PathLike[str], *, context: DistributedContext) -> Iterator[OutputClaim]:
    """Hold ``out`` for one export: check, create and lock it; put it back if the export fails.

    Every rank calls it at the same point; rank 0 does the work and tells the others whether it
    succeeded. On success the lock file is removed; on an error (or Ctrl-C) before any shard is
    finished, so are the manifest the export wrote and the folders the claim created.

    Raises:
        InputError: ``out`` is a file.
        OutputError: ``out`` cannot be created or written (read-only, no permission, no space).
        CacheError: another export holds ``out`` (the message names its pid).
    """
    claim = OutputClaim(Path(out), context)
    on_main_rank(context, claim._acquire, failed=f"{claim.folder}: rank 0 could not claim this folder")
    try:
        yield claim
    except BaseException:
        if context.is_main:
            claim._undo()
        raise
    if context.is_main:
        claim._release(remove_folders=False)
