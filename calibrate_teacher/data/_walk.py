"""The safe walk of an image folder: which entries are class folders and images, and which are refused.

:func:`_scan` lists ``root/<class>/<image>`` for
:class:`~calibrate_teacher.data.images.ImageFolderSource` and
:class:`~calibrate_teacher.data.dataset.ImageFolderDataset`, so both see the same samples in the
same order; :func:`_open_regular` opens an image only if it is a regular file. The layout and
safety rules (symlinks followed only inside the root and never into a loop, only regular files
read) are written down in :mod:`calibrate_teacher.data.images`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from calibrate_teacher.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_LIST_FILE = "classes.txt"


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _why(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class _NotRegularFileError(OSError):
    pass


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _open_regular(path: Path) -> BinaryIO:
    # stat first so that a device is never opened at all; O_NONBLOCK plus fstat closes the race
    # where the file is swapped for a FIFO in between (a plain open of a FIFO blocks).
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        fp = open(path, "rb", opener=_nonblocking)  # noqa: SIM115  # returned open
        mode = os.fstat(fp.fileno()).st_mode
        if stat.S_ISREG(mode):
            return fp
        fp.close()
    raise _NotRegularFileError(f"{_kind(mode)}, not a regular file")


@dataclass(frozen=True)
class _Scan:
    files: tuple[str, ...]  # keys (relative posix paths)
    labels: tuple[int, ...]
    ignored: int
    skipped: tuple[tuple[str, str], ...]  # (key, reason) of entries refused (skip_bad only)


class _Walker:
    # Lists the images below class folders by hand (os.scandir), because os.walk either never
    # follows folder links or follows every one (out of the root, round loops) and drops the
    # folders it cannot list without a word.
    def __init__(self, root: Path, *, skip_bad: bool) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.skip_bad = skip_bad
        self.ignored = 0
        self.skipped: list[tuple[str, str]] = []

    def problem(self, key: str, reason: str, fix: str) -> None:
        if not self.skip_bad:
            raise InputError(f"{self.root / key}: {reason}; {fix}, or pass --skip-bad to skip it")
        self.skipped.append((key, reason))

    def inside(self, real: str) -> bool:
        try:
            return os.path.commonpath([real, self.real_root]) == self.real_root
        except ValueError:  # Windows: another drive
            return False

    def follow(self, key: str, path: str, ancestors: frozenset[str]) -> str | None:
        """Return the real path of the linked folder at ``key``, or None where it is refused."""
        real = os.path.realpath(path)
        if real in ancestors:
            self.problem(
                key, f"symlink points into a loop (to {real}, a folder above it)", "remove the link"
            )
        elif not self.inside(real):
            self.problem(
                key,
                f"symlink points outside the data folder (to {real})",
                "move or copy its target into the folder, or remove the link",
            )
        else:
            return real
        return None

    def regular(self, key: str, entry: os.DirEntry[str]) -> bool:
        """Whether the image file at ``key`` may be read (a regular file inside the root)."""
        if not entry.is_symlink() and entry.is_file(follow_symlinks=False):
            return True  # the common case, answered from the folder listing without a stat
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if not self.inside(real):
                self.problem(
                    key,
                    f"symlink points outside the data folder (to {real})",
                    "copy the file into the folder, or remove the link",
                )
                return False
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            self.problem(key, f"cannot read the file ({_why(exc)})", "fix or remove it")
            return False
        if not stat.S_ISREG(mode):
            self.problem(
                key,
                f"is {_kind(mode)}, not a regular file",
                "only regular files are read as images; remove or rename it",
            )
            return False
        return True

    def listing(self, key: str) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(os.path.join(self.root, key)) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.problem(
                key, f"cannot read the folder ({_why(exc)})", "fix its permissions or move it out"
            )
            return None

    def images(self, top: os.DirEntry[str]) -> list[str]:
        """Return the keys of the images below the class folder ``top``, sorted."""
        roots = frozenset({self.real_root})
        if top.is_symlink():
            real = self.follow(top.name, top.path, roots)
            if real is None:
                return []
        else:
            real = os.path.join(self.real_root, top.name)
        # Each folder carries the real paths of the folders above it: a link to one is a loop.
        stack = [(top.name, real, roots | {real})]
        found: list[str] = []
        while stack:
            key, real, ancestors = stack.pop()
            folders: list[tuple[str, str, frozenset[str]]] = []
            for entry in self.listing(key) or ():
                child = f"{key}/{entry.name}"
                if not _visible(entry.name):
                    if not entry.is_dir():  # hidden folders are left out without a count
                        self.ignored += 1
                elif entry.is_dir():
                    target: str | None = os.path.join(real, entry.name)
                    if entry.is_symlink():
                        target = self.follow(child, entry.path, ancestors)
                    if target is not None:
                        folders.append((child, target, ancestors | {target}))
                elif not _is_image_name(entry.name):
                    self.ignored += 1
                elif self.regular(child, entry):
                    found.append(child)
            stack.extend(reversed(folders))  # depth first in name order: problems come in order
        return sorted(found)


def _scan(
    root: Path, class_names: tuple[str, ...] | None, list_source: str, *, skip_bad: bool
) -> tuple[_Scan, tuple[str, ...]]:
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise InputError(
            f"{root}: cannot read the folder ({_why(exc)}); fix its permissions"
        ) from exc
    folders = {e.name: e for e in entries if _visible(e.name) and e.is_dir()}
    top_files = [e.name for e in entries if e.is_file() and e.name != CLASS_LIST_FILE]
    if not folders:
        if any(_is_image_name(n) for n in top_files):
            raise InputError(
                f"{root}: holds images but no class subfolders; the layout is "
                f"{root}/<class>/<image> (one folder per class)"
            )
        raise InputError(
            f"{root}: no class subfolders (the folder is empty); the layout is "
            f"{root}/<class>/<image> (one folder per class)"
        )
    if class_names is None:
        class_names = tuple(folders)
    position = {name: i for i, name in enumerate(class_names)}
    for name in folders:
        if name not in position:
            raise InputError(
                f"{root / name}: folder is not a class listed in {list_source}; "
                "add it to the list or move the folder out"
            )
    walker = _Walker(root, skip_bad=skip_bad)
    walker.ignored = len(top_files)
    files: list[str] = []
    labels: list[int] = []
    for name in sorted(folders, key=position.__getitem__):
        # A class whose folder is skipped keeps its label: the other labels do not shift.
        found = walker.images(folders[name])
        files.extend(found)
        labels.extend([position[name]] * len(found))
    if not files and walker.skipped:
        key, reason = walker.skipped[0]
        raise InputError(
            f"{root}: no readable images; {len(walker.skipped)} entries were skipped, the first "
            f"{root / key} ({reason})"
        )
    if not files:
        raise InputError(
            f"{root}: no images in its {len(folders)} class folder(s); "
            f"image files end in {', '.join(IMAGE_SUFFIXES)}"
        )
    scan = _Scan(tuple(files), tuple(labels), walker.ignored, tuple(walker.skipped))
    return scan, class_names
