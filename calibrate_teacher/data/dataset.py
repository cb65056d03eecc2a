"""An indexable image-folder dataset for training scripts, in the order the soft-label cache uses.

:class:`ImageFolderDataset` is a map-style dataset (``len`` and ``[i]``) over the same folder
layout as :class:`~calibrate_teacher.data.images.ImageFolderSource`, found by the same scan, so
sample ``i`` is row ``i`` of a cache that ``export-soft-labels`` wrote from that folder, and
:attr:`ImageFolderDataset.keys` equals the cache's ``keys.txt``. Wrapped in
:class:`~calibrate_teacher.soft_labels.SoftLabelDataset`, each item gains the teacher's
calibrated logits::

    train = ImageFolderDataset("train/", transform=augment)     # training augmentations
    data = SoftLabelDataset(train, "cache/", keys=train.keys)   # checks the order, row by row

Without a ``transform`` an item is the image preprocessed for the teacher
(:func:`~calibrate_teacher.data.transform.preprocess_image`, given ``preprocess``), or, with
neither, the decoded Pillow image as torchvision's ``ImageFolder`` gives it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from calibrate_teacher.data._walk import CLASS_LIST_FILE, _open_regular, _scan
from calibrate_teacher.data.images import _check_class_names, read_class_list
from calibrate_teacher.data.preprocess import PreprocessConfig, resolve_preprocess
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    from PIL import Image
    from torch.utils.data import Dataset as _DatasetBase

__all__ = ["ImageFolderDataset"]

_T = TypeVar("_T", covariant=True)

if not TYPE_CHECKING:  # torch is imported lazily; a DataLoader only needs len() and [i]

    class _DatasetBase(Generic[_T]):
        pass


class ImageFolderDataset(_DatasetBase[tuple[object, int]]):
    """Images in ``root/<class>/<image>`` as ``(image, label)`` items, in the cache's row order.

    The samples, their order, labels and keys are exactly those of
    :class:`~calibrate_teacher.data.images.ImageFolderSource` over the same folder and class
    list (the same scan): ordered by label, then by key, a key being the path relative to
    ``root`` (``cat/0001.jpg``). Items are decoded when read, so the dataset is cheap to build
    and to send to DataLoader worker processes (it holds paths, not pixels).

    Args:
        root: The image folder.
        transform: Called with each decoded Pillow image (its mode as stored: convert in the
            transform where it matters); its result is the item's first element. For
            training augmentations (e.g. a torchvision ``Compose``).
        preprocess: Without ``transform``: the teacher's preprocessing, as a
            :class:`~calibrate_teacher.data.preprocess.PreprocessConfig`, a dict of its timm
            keys (a cache's ``manifest.data["source"]["preprocess"]``), or a preprocess JSON
            file; items are then float32 tensors ``[C, H, W]``, as the teacher saw them.
        classes: Class names in label order, or a text file of them; by default
            ``root/classes.txt`` where it exists, else the sorted subfolder names (give the
            same list as to the export, or the labels differ).

    Attributes:
        root: The folder.
        keys: Each sample's key, in order (compare with ``SoftLabelCache.keys``).
        labels: Each sample's label, in order.
        class_names: Class names in label order.
        preprocess: The preprocessing applied, or None (a ``transform``, or raw images).
        transform: The transform applied, or None.

    Raises:
        InputError: the folder is missing, empty or has no images; a class list is missing
            or invalid, or lacks a folder; the folder holds a symlink out of it or into a loop,
            a FIFO/socket/device named like an image, or a folder that cannot be listed; a
            preprocess file is missing or invalid.
        InvalidValueError: both ``transform`` and ``preprocess`` are given.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> root = Path(folder.name)
        >>> for key in ("b/2.png", "a/9.png", "b/1.png"):
        ...     (root / key).parent.mkdir(exist_ok=True)
        ...     Image.new("L", (4, 4)).save(root / key)
        >>> data = ImageFolderDataset(root, preprocess={"input_size": [1, 2, 2]})
        >>> data.keys, data.labels, data[1][0].shape
        (('a/9.png', 'b/1.png', 'b/2.png'), (0, 1, 1), torch.Size([1, 2, 2]))
        >>> folder.cleanup()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        transform: Callable[[Image.Image], object] | None = None,
        preprocess: PreprocessConfig | Mapping[str, object] | str | os.PathLike[str] | None = None,
        classes: Sequence[str] | str | os.PathLike[str] | None = None,
    ) -> None:
        """Scan ``root`` and fix the sample order (nothing is decoded yet)."""
        if transform is not None and preprocess is not None:
            raise InvalidValueError(
                "ImageFolderDataset: give transform (your own, e.g. augmentations) or preprocess "
                "(the teacher's), not both; a transform can call preprocess_image itself"
            )
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such folder; give the image folder the cache was exported from")
        names, origin = _class_names(self.root, classes)
        # The scan ImageFolderSource runs (without skip_bad, as export-soft-labels does), so
        # the rows match the cache's one for one.
        scan, names = _scan(self.root, names, origin, skip_bad=False)
        self.keys: tuple[str, ...] = scan.files
        self.labels: tuple[int, ...] = scan.labels
        self.class_names: tuple[str, ...] = names
        self.transform = transform
        self.preprocess: PreprocessConfig | None = _config(preprocess)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[object, int]:
        """Return ``(image, label)`` of sample ``index`` (negative indices count from the end).

        The image is ``transform(pil_image)``, the preprocessed tensor, or the Pillow image.

        Raises:
            IndexError: ``index`` is out of range.
            InputError: the image cannot be read or decoded.
        """
        n = len(self.keys)
        if not -n <= index < n:
            raise IndexError(f"ImageFolderDataset: index {index} out of range for {n} samples")
        index %= n
        image = self._load(self.keys[index])
        item: object = image
        if self.transform is not None:
            item = self.transform(image)
        elif self.preprocess is not None:
            from calibrate_teacher.data.transform import preprocess_image

            item = preprocess_image(image, self.preprocess)
        return item, self.labels[index]

    def __repr__(self) -> str:
        """Say what the dataset holds and how items are made."""
        how = (
            "transform" if self.transform is not None
            else f"preprocess {list(self.preprocess.input_size)}" if self.preprocess is not None
            else "raw PIL images"
        )
        return (
            f"ImageFolderDataset({str(self.root)!r}: {len(self)} images, "
            f"{len(self.class_names)} classes, {how})"
        )

    def _load(self, key: str) -> Image.Image:
        from PIL import Image, UnidentifiedImageError

        path = self.root / key
        # The errors Pillow raises for corrupt, truncated or unreadable files (OSError covers
        # permissions and a file swapped for a FIFO after the scan); anything else is a bug.
        decode_errors = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
        try:
            with _open_regular(path) as fp:
                image = Image.open(fp)
                image.load()  # the pixels are read now, so the image outlives the file
                return image
        except UnidentifiedImageError:
            reason = "no image format recognises the file"
        except decode_errors as exc:
            reason = f"{type(exc).__name__}: {exc}"
        raise InputError(f"{path}: cannot decode the image ({reason}); replace or remove it, and re-export the cache")


def _class_names(
    root: Path, classes: Sequence[str] | str | os.PathLike[str] | None
) -> tuple[tuple[str, ...] | None, str]:
    # The class-list rules of ImageFolderSource and open_data: given, classes.txt, sorted folders.
    if isinstance(classes, str | os.PathLike):
        file = Path(classes)
        if not file.is_file():
            raise InputError(f"{file}: no such class list; give a text file with one class per line")
        return read_class_list(file), str(file)
    if classes is not None:
        return _check_class_names(classes, source="the given class list"), "the given class list"
    if (root / CLASS_LIST_FILE).is_file():
        return read_class_list(root / CLASS_LIST_FILE), str(root / CLASS_LIST_FILE)
    return None, "sorted subfolder names"


def _config(
    preprocess: PreprocessConfig | Mapping[str, object] | str | os.PathLike[str] | None,
) -> PreprocessConfig | None:
    if preprocess is None or isinstance(preprocess, PreprocessConfig):
        return preprocess
    if isinstance(preprocess, Mapping):
        return PreprocessConfig.from_dict(preprocess, source="preprocess")
    return resolve_preprocess(preprocess=preprocess).config
