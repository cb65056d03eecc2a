"""Image folders in the ImageFolder layout (``root/<class>/<image>``), decoded with Pillow.

Layout rules (the ones torchvision's ``ImageFolder`` and timm use, written down once):

- Each subfolder of ``root`` is a class; images may sit in nested folders below it.
- Class order is the sorted folder names, unless a class list is given (``classes.txt`` in
  ``root``, one name per line, or the ``classes`` argument); then a label is the position of
  its folder's name in that list, every folder must be listed, and listed classes may have
  no folder (a validation subset).
- Images are files with the suffixes in :data:`IMAGE_SUFFIXES` (any case); other files, files
  directly in ``root`` and hidden files or folders (``.name``) are left out and counted.
- A sample's key is its path relative to ``root`` with ``/`` separators
  (``cat/0001.jpg``); samples are ordered by label, then by key.

Safety rules (issue #12): a symlinked folder is followed only when its target lies inside the
(resolved) root and is not a folder above the link (a loop); a symlinked image only when its
target lies inside the root. Only regular files are opened, so a FIFO, socket or device named
``x.png`` never blocks the run. A refused link, a non-regular image file or a folder that cannot
be listed is an :class:`~calibrate_teacher.errors.InputError` naming it, or, with
``skip_bad=True``, an entry in ``skipped`` (the run goes on without it).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from calibrate_teacher.data._loader import Chunk, iterate
from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from calibrate_teacher.data.base import Batch
    from calibrate_teacher.data.preprocess import PreprocessConfig

__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource", "read_class_list"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_LIST_FILE = "classes.txt"


def read_class_list(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Read class names, one per line (blank lines and surrounding spaces ignored).

    Raises:
        InputError: the file is missing or unreadable, empty, or repeats a name.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the class list ({exc})") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    return _check_class_names(names, source=str(p))


def _check_class_names(names: Sequence[str], *, source: str) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    if not names:
        raise InputError(f"{source}: the class list is empty; give one class name per line")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(
                f"{source}: class {name!r} is listed twice; class names must be unique"
            )
        seen.add(name)
    return names


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


class _ImageReader:
    # Picklable: worker processes get the root, the keys and the config, nothing else.
    def __init__(
        self, root: Path, files: tuple[str, ...], labels: tuple[int, ...], config: PreprocessConfig
    ) -> None:
        self.root = root
        self.files = files
        self.labels = labels
        self.config = config

    def read(self, indices: list[int]) -> Chunk:
        import torch
        from PIL import Image, UnidentifiedImageError

        from calibrate_teacher.data.transform import preprocess_image

        # The errors Pillow raises for corrupt, truncated or unreadable files (OSError covers
        # UnidentifiedImageError and permissions); anything else is a bug and propagates.
        decode_errors = (
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            struct.error,
            Image.DecompressionBombError,
        )
        tensors, good, bad = [], [], []
        for index in indices:
            try:
                with _open_regular(self.root / self.files[index]) as fp, Image.open(fp) as image:
                    image.load()
                    tensors.append(preprocess_image(image, self.config))
            except _NotRegularFileError as exc:  # swapped for a FIFO or device after the scan
                bad.append((index, str(exc)))
                continue
            except UnidentifiedImageError:
                # Pillow's own text names the file object; the message names the file already.
                bad.append((index, "UnidentifiedImageError: no image format recognises the file"))
                continue
            except decode_errors as exc:
                bad.append((index, f"{type(exc).__name__}: {exc}"))
                continue
            good.append(index)
        c, h, w = self.config.input_size
        inputs = torch.stack(tensors) if tensors else torch.empty((0, c, h, w))
        return Chunk(
            inputs=inputs,
            labels=torch.tensor([self.labels[i] for i in good], dtype=torch.int64),
            indices=torch.tensor(good, dtype=torch.int64),
            bad=tuple(bad),
        )


class ImageFolderSource:
    """Images in ``root/<class>/<image>``, preprocessed for one teacher.

    Attributes:
        path: The folder.
        num_classes: The number of classes (the class list's length).
        class_names: Class names in label order.
        config: The preprocessing applied.
        description: What the source is, for reports (kind, path, num_samples, classes,
            class list origin, preprocess and its origin, ignored files).
        skipped: ``(key, reason)`` for each entry skipped with ``skip_bad=True``: an image that
            cannot be decoded, a refused symlink, a FIFO/socket/device named like an image, or
            a folder that cannot be listed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        config: PreprocessConfig,
        config_origin: str = "given",
        class_names: Sequence[str] | None = None,
        class_names_origin: str = "the class list",
        skip_bad: bool = False,
    ) -> None:
        """Scan ``root`` and fix the sample order.

        Args:
            root: The image folder.
            config: The preprocessing to apply.
            config_origin: Where ``config`` came from, for the description.
            class_names: The class order; None to use the sorted folder names, or
                ``root/classes.txt`` where it exists.
            class_names_origin: Where ``class_names`` came from, for messages.
            skip_bad: Record unreadable images, refused symlinks, non-regular image files and
                unlistable folders in ``skipped`` and go on, instead of raising.

        Raises:
            InputError: the folder is missing or empty, has no class subfolders or no images,
                or holds a folder the class list lacks; without ``skip_bad``, it holds a
                symlink out of the folder or into a loop, a FIFO/socket/device named like an
                image, or a folder that cannot be listed.
        """
        self.path = Path(root)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: no such folder")
        names: tuple[str, ...] | None
        if class_names is not None:
            names = _check_class_names(class_names, source=class_names_origin)
            origin = class_names_origin
        elif (self.path / CLASS_LIST_FILE).is_file():
            names = read_class_list(self.path / CLASS_LIST_FILE)
            origin = str(self.path / CLASS_LIST_FILE)
        else:
            names, origin = None, "sorted subfolder names"
        scan, names = _scan(self.path, names, origin, skip_bad=skip_bad)
        self.class_names: tuple[str, ...] | None = names
        self.num_classes: int | None = len(names)
        self.config = config
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = list(scan.skipped)
        self._reader = _ImageReader(self.path, scan.files, scan.labels, config)
        self.description: dict[str, object] = {
            "kind": "image_folder",
            "path": str(self.path),
            "num_samples": len(scan.files),
            "num_classes": len(names),
            "classes": list(names),
            "classes_from": origin,
            "preprocess": config.to_json(),
            "preprocess_from": config_origin,
            "ignored_files": scan.ignored,
        }

    def __len__(self) -> int:
        """Return the number of images found."""
        return len(self._reader.files)

    def key(self, index: int) -> str:
        """Return the key (relative path) of the sample at ``index``."""
        return self._reader.files[index]

    def batches(
        self,
        *,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield preprocessed batches in source order (or ``indices`` order).

        Args:
            batch_size: Images per batch (a batch may be smaller where images are skipped).
            workers: DataLoader worker processes decoding images (0: in this process).
            pin_memory: Put inputs in page-locked memory (for a CUDA teacher).
            indices: A subset of sample positions, in the order wanted.

        Raises:
            InputError: an image cannot be decoded and ``skip_bad`` is false.
        """
        return iterate(
            self._reader,
            len(self),
            batch_size=batch_size,
            workers=workers,
            pin_memory=pin_memory,
            indices=indices,
            key=self.key,
            describe_bad=self._describe_bad,
            skipped=self.skipped if self.skip_bad else None,
        )

    def _describe_bad(self, index: int, reason: str) -> str:
        return (
            f"{self.path / self.key(index)}: cannot decode the image ({reason}); "
            "replace or remove it, or pass --skip-bad to skip unreadable images"
        )
