"""Writing outputs safely: a temporary name, fsync, then an atomic rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from calibrate_teacher.errors import OutputError, OutputExistsError

#: errno values that mean "the file system refused", not "the program is wrong".
FILESYSTEM_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
)


def check_output(path: str | os.PathLike[str], *, overwrite: bool, directory: bool = False) -> Path:
    """Return ``path`` as a Path once it is known that the output can be written there.

    Checked before any long run, so a bad destination fails in a second, not after an hour:
    the path must not exist (unless ``overwrite``), must not be a folder where a file goes (or
    the reverse), and its folder must really accept a new file (a probe file is created and
    removed: permissions, read-only mounts and immutable folders all show up).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: the path cannot be written.
    """
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
        if out.is_dir() != directory:
            what = "a folder" if out.is_dir() else "a file"
            raise OutputError(f"{out}: is {what}; give a {'folder' if directory else 'file'} path")
    check_writable(out.parent, purpose=str(out))
    return out


def check_writable(folder: str | os.PathLike[str], *, purpose: str | None = None) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``folder``.

    Where ``folder`` does not exist yet, its nearest existing ancestor must accept new entries
    (the folders are created later).
    """
    target = Path(folder)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    name = purpose or str(target)
    if not probe.is_dir():
        raise OutputError(f"{name}: {probe} is not a folder; choose another output path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".calibrate-teacher-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputError(
            f"{name}: cannot write in {probe} ({exc.strerror or exc}); choose another output path"
        ) from exc


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    directory: bool = False,
    max_mode: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The checked front of :func:`replaced`: the output must be free (or ``overwrite``) and
    writable, its folder is created, and a file-system refusal inside the block becomes one
    :class:`OutputError` naming ``path``.

    Args:
        path: The final output path.
        overwrite: Replace an existing ``path``; otherwise an existing one raises.
        directory: The output is a folder (the temporary folder is created for you).
        max_mode: Permission bits the file may have at most (e.g. its input's), on top of
            the umask: a copy of a private file stays private.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: ``path`` cannot be written (a one-line error naming it).
    """
    out = check_output(path, overwrite=overwrite, directory=directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced(out, directory=directory, max_mode=max_mode) as tmp:
            yield tmp
    except OSError as exc:
        if exc.errno not in FILESYSTEM_ERRNOS:
            raise
        raise OutputError(
            f"{out}: cannot be written ({exc.strerror}); nothing was written, "
            "free space or choose another output path"
        ) from exc


@contextlib.contextmanager
def replaced(path: Path, *, directory: bool = False, max_mode: int | None = None) -> Iterator[Path]:
    """The one atomic write: a temporary name beside ``path``, fsync, then an atomic replace.

    The temporary name lives in the same folder, so the final rename is atomic on one file
    system, and ``os.replace`` never leaves a moment without ``path``: a kill at any point leaves
    the old file or the new one (plus, at worst, a stray ``.NAME.*.tmp``). On any exception the
    temporary file (or folder) is removed and ``path`` is untouched. Nothing is checked first:
    callers that need ``overwrite`` or writability checks use :func:`atomic_output`.
    """
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not directory:
            fsync_file(tmp)
            # mkstemp makes 0600; outputs get what a plain open() would, capped by max_mode
            os.chmod(tmp, default_file_mode() & (0o777 if max_mode is None else max_mode))
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be replaced atomically: move the old one aside first, so that a
            # crash leaves either the old or the new one under a findable name, never neither.
            aside = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)  # atomic, also over an existing file
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def default_file_mode() -> int:
    """What a plain ``open(path, "w")`` would give: 0o666 less the umask.

    Read from ``/proc`` rather than with ``os.umask``, which sets the process-wide umask for a
    moment and so races with writer threads.
    """
    try:
        with open("/proc/self/status") as fh:
            umask = next((int(line.split()[1], 8) for line in fh if line.startswith("Umask:")), None)
    except OSError:
        umask = None
    if umask is None:  # no /proc (macOS): the two-call dance, once
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks.

    A folder (a Hugging Face model directory) hashes as the SHA-256 of one line per regular file
    below it, in sorted order: its relative path, a space, its SHA-256. Renaming, adding or
    changing any file changes it.
    """
    digest = hashlib.sha256()
    if os.path.isdir(path):
        root = Path(path)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(root).as_posix()} {sha256_file(file)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
