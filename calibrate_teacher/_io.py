"""Writing outputs safely: a temporary name, fsync, then an atomic rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from calibrate_teacher.errors import OutputExistsError


def check_output(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Return ``path`` as a Path, raising if it exists and ``overwrite`` is false."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary name lives in the same folder, so the final rename is atomic on one file
    system. On any exception the temporary file (or folder) is removed and ``path`` is untouched.

    Args:
        path: The final output path.
        overwrite: Replace an existing ``path``; otherwise an existing one raises.
        directory: The output is a folder (the temporary folder is created for you).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    out = check_output(path, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not directory:
            fsync_file(tmp)
            os.chmod(tmp, _default_mode())  # mkstemp makes 0600; outputs get the usual umask
        if out.is_dir() and not out.is_symlink():
            # A folder cannot be replaced atomically: move the old one aside first, so that a
            # crash leaves either the old or the new one under a findable name, never neither.
            aside = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, aside)
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)  # atomic, also over an existing file
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
