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
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.data._loader import Chunk, iterate
from calibrate_teacher.data._walk import (
    CLASS_LIST_FILE,
    IMAGE_SUFFIXES,
    _NotRegularFileError,
    _open_regular,
    _scan,
)
from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from calibrate_teacher.data.base import Batch
    from calibrate_teacher.data.preprocess import PreprocessConfig

__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource", "read_class_list"]


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
