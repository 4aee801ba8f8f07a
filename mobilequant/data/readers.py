"""Users' calibration and evaluation data: a folder of images, one image file, or a ``.npy`` / ``.npz`` array.

Folder rules
    Image files (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm .pbm``, any case) are read in
    sorted order of their path relative to the folder, so the order is the same on every machine. If the
    folder has sub-folders holding images, each first-level sub-folder is a class: labels are the class
    folders' positions in sorted name order (``ImageData.classes``), which :func:`mobilequant.data.fit_labels`
    maps onto a model's classes before they are used; images may sit at any depth below their class
    folder (linked folders are followed, each once); image files beside the class folders are then an
    error. Without sub-folders the images are unlabelled. Hidden files and folders (name starting with
    ".") and other files are ignored. EXIF orientation is applied.

Array rules (``.npy``: one array of images; ``.npz``: images under ``images`` (or ``x``), optional int
labels under ``labels`` (or ``y``); an ``.npz`` holding a single array is that array of images)
    * uint8 arrays are raw images, preprocessed like image files: ``N×H×W`` (grey) or ``N×H×W×C``
      (C = 1, 3 or 4). A uint8 ``N×C×H×W`` array (C = 1 or 3 and a last side that is not 1, 3 or 4) is
      taken as channels-first and transposed.
    * float arrays are already-preprocessed model input, used as is: ``N×C×H×W`` equal to the model's
      ``input_size``, finite values (a :class:`DataWarning` when they look like raw or [0, 1] pixels).
    * any other dtype is an error, and so is an array of Python objects (never loaded: no pickle is read).
    * each array's ``.npy`` header is checked before its data are read: the shape against these rules and
      the bytes that follow it, the size against :data:`MAX_ARRAY_BYTES` (8 GiB) as stored and as the
      float32 images made from it; running out of memory all the same is one error line.

An unreadable image is skipped with a :class:`BadImageWarning` naming it (``on_bad_image="skip"``, the
default) or raises :class:`~mobilequant.errors.InputError` naming it (``on_bad_image="error"``).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..models import PreprocessConfig
from .preprocess import preprocess_images

__all__ = ["IMAGE_SUFFIXES", "BadImageWarning", "DataWarning", "ImageData", "read_array_file", "read_image_file",
           "read_image_folder", "read_images"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm"})
_ON_BAD = ("skip", "error")


class BadImageWarning(UserWarning):
    """An image file that could not be decoded was skipped."""


class DataWarning(UserWarning):
    """Data that are read as given but look unlike what the model expects."""


def spread_indices(total: int, count: int) -> np.ndarray:
    """The indices of ``count`` of ``total`` items evenly spread, in order (``count < total``): what
    :meth:`ImageData.spread` picks, and what a reader picks before preprocessing."""
    if count < 1:
        raise UsageError(f"image count must be at least 1, got {count}")
    return np.arange(count, dtype=np.int64) * total // count


@dataclass(frozen=True)
class ImageData:
    """Preprocessed images ready for a model: float32 ``N×C×H×W`` and optional int64 labels.

    ``source`` says where they came from (a path, or ``fashion-mnist:test``); ``classes`` names the
    labels when known.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise ValueError(f"images must be float32 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),)):
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(images, labels)`` in order, ``batch_size`` at a time (the last batch may be smaller).

        ``labels`` is ``None`` for unlabelled data.
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.images[start:stop], None if self.labels is None else self.labels[start:stop]

    def spread(self, count: int) -> ImageData:
        """``count`` images evenly spread over the set, in order (all of them when ``count ≥ len(self)``).

        Not the first ``count``: a class-folder set is sorted by class, so its first images are one class.
        """
        if count >= len(self):
            return self
        return self.subset(spread_indices(len(self), count))

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor | slice) -> ImageData:
        """The images at ``indices`` (a slice or a sequence of ints), in that order."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            if indices.ndim != 1:
                raise UsageError("subset indices must be one-dimensional")
            if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
                raise UsageError(f"subset index out of range for {len(self)} images")
        return ImageData(self.images[indices], None if self.labels is None else self.labels[indices],
                         self.source, self.classes)


def _check_on_bad(on_bad_image: str) -> None:
    if on_bad_image not in _ON_BAD:
        raise UsageError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")


def _decode(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HW (grey) or HWC (RGB); raise the decoder's exception if it cannot."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)  # a phone photo's pixels as it is shown (EXIF orientation)
        grey = im.getbands() in (("L",), ("L", "A"), ("1",), ("I",), ("F",)) or im.mode.startswith("I;")
        if im.mode.startswith("I;16"):  # 16-bit grey: 0..65535 → 0..255
            return np.round(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8)
        if im.mode in ("I", "F"):
            # 32-bit int and float grey have no fixed range: scale the image's own range to 0..255.
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            return np.round((a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)).astype(np.uint8)
        return np.asarray(im.convert("L" if grey else "RGB"))


def _read_images(paths: Sequence[Path], root: Path, on_bad_image: str) -> tuple[list[np.ndarray], list[int]]:
    """Decode ``paths``; returns the images and the positions in ``paths`` that were read."""
    from PIL import Image

    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(_decode(path))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            shown = path.relative_to(root) if path != root else path
            message = f"cannot read image {shown} in {root}: {type(e).__name__}: {e}"
            if on_bad_image == "error":
                raise InputError(message) from None
            warnings.warn(f"skipping {message}", BadImageWarning, stacklevel=3)
            continue
        kept.append(i)
    return images, kept


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: walked already
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_image_folder(folder: str | os.PathLike, cfg: PreprocessConfig, on_bad_image: str = "skip") -> ImageData:
    """Read a folder of images (see the module docstring for class sub-folders and order)."""
    _check_on_bad(on_bad_image)
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    top = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p for p in top if p.is_file() and _is_image(p)]
    class_dirs = [p for p in top if p.is_dir() and _images_below(p)]
    if class_dirs and loose:
        raise InputError(f"{folder} mixes class sub-folders ({class_dirs[0].name}, ...) with loose images "
                         f"({loose[0].name}, ...); put every image in a class folder, or use no sub-folders")
    if class_dirs:
        classes = tuple(d.name for d in class_dirs)
        paths, labels = [], []
        for label, d in enumerate(class_dirs):
            below = _images_below(d)
            paths += below
            labels += [label] * len(below)
    else:
        classes, paths, labels = None, loose, None
    if not paths:
        raise InputError(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    images, kept = _read_images(paths, folder, on_bad_image)
    if not images:
        raise InputError(f"none of the {len(paths)} image files in {folder} could be read")
    label_tensor = None if labels is None else torch.tensor([labels[i] for i in kept], dtype=torch.int64)
    return ImageData(preprocess_images(images, cfg), label_tensor, str(folder), classes)


def read_image_file(path: str | os.PathLike, cfg: PreprocessConfig) -> ImageData:
    """One image file as a batch of one, unlabelled."""
    path = Path(path)
    images, _ = _read_images([path], path, "error")
    return ImageData(preprocess_images(images, cfg), None, str(path))


MAX_ARRAY_BYTES = 8 << 30  # the most an array read from a data file, or the float32 images made from it, may take


@dataclass(frozen=True)
class _Declared:
    """What an ``.npy`` header (a file's, or an ``.npz`` member's) says the array is, read before its data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    available: int  # bytes that follow the header in the file (member)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(stream: BinaryIO, size: int, path: Path) -> _Declared:
    """The header at the start of ``stream`` (``size`` bytes in all); :class:`InputError` when it is none."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(stream)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error):
        raise InputError(f"cannot read {path}: not a NumPy .npy file") from None
    if dtype.hasobject:  # their data are a pickle: never loaded (allow_pickle=False)
        raise InputError(f"cannot read {path}: it holds Python objects, which are not loaded "
                         "(save a plain numeric array)")
    declared = _Declared(tuple(int(n) for n in shape), dtype, size - stream.tell())
    if declared.nbytes > declared.available:
        raise InputError(f"cannot read {path}: truncated (its header declares {dtype} of shape {declared.shape}, "
                         f"{declared.nbytes:,} bytes, but {max(declared.available, 0):,} follow it)")
    return declared


def _size(nbytes: int) -> str:
    """``3.1 GiB``, ``256.0 KiB``, ``12 bytes``."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} bytes"


def _too_big(nbytes: int, what: str, path: Path) -> None:
    if nbytes > MAX_ARRAY_BYTES:
        raise InputError(f"{path}: {what} would take {_size(nbytes)} in memory, more than the "
                         f"{_size(MAX_ARRAY_BYTES)} read at once; pass fewer images")


def _check_declared(images: _Declared, labels: _Declared | None, cfg: PreprocessConfig, path: Path) -> None:
    """Refuse, from the headers alone, arrays that could not be used or would not fit in memory: the shape
    and type rules of the module docstring, and :data:`MAX_ARRAY_BYTES` for the array as stored and the
    float32 images made from it (a file whose header claimed 1e11 images ended in numpy's MemoryError
    traceback; a 3 MB compressed .npz was inflated to 3.4 GB before its shape was refused)."""
    _check_images(images.shape, images.dtype, cfg, path)
    count = images.shape[0]
    _too_big(images.nbytes, f"{count:,} images of {images.dtype} stored as {images.shape}", path)
    _too_big(count * math.prod(cfg.input_size) * 4, f"{count:,} preprocessed images", path)
    if labels is not None:
        _check_labels(labels.shape, labels.dtype, count, path)


def _read_arrays(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The images and labels arrays of an ``.npy`` / ``.npz`` file, their headers checked before any data
    are read (:func:`_check_declared`)."""
    fmt = np.lib.format
    if not path.is_file():  # a pipe or a device (/dev/zero) would be read without end
        raise InputError(f"cannot read {path}: " + ("not a regular file" if path.exists() else "no such file"))
    if path.suffix.lower() != ".npz":
        with path.open("rb") as f:
            images = _read_header(f, os.fstat(f.fileno()).st_size, path)
            _check_declared(images, None, cfg, path)
            f.seek(0)
            return fmt.read_array(f, allow_pickle=False), None
    with zipfile.ZipFile(path) as z:
        members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in z.infolist()}
        images_name = _pick(members, ("images", "x"), path)
        labels_name = _pick(members, ("labels", "y"), path)
        if images_name is None:
            if len(members) != 1:
                raise InputError(f"{path} holds {sorted(members)}; name the images array 'images' "
                                 "(and the labels 'labels')")
            images_name = next(iter(members))
        names = [images_name] if labels_name is None else [images_name, labels_name]
        declared = []
        for name in names:
            with z.open(members[name]) as member:
                declared.append(_read_header(member, members[name].file_size, path))
        _check_declared(declared[0], declared[1] if labels_name else None, cfg, path)
        arrays = []
        for name in names:
            with z.open(members[name]) as member:
                arrays.append(fmt.read_array(member, allow_pickle=False))
    return arrays[0], (arrays[1] if labels_name else None)


def _pick(members: dict, names: tuple[str, ...], path: Path) -> str | None:
    present = [n for n in names if n in members]
    if len(present) > 1:
        raise InputError(f"{path} holds both {present[0]!r} and {present[1]!r}; keep one")
    return present[0] if present else None


def read_array_file(path: str | os.PathLike, cfg: PreprocessConfig) -> ImageData:
    """Read a ``.npy`` or ``.npz`` file of images (see the module docstring for the rules). Each array's
    header is checked before its data are read: its shape against the model's input and its size against
    the file and :data:`MAX_ARRAY_BYTES`; arrays of Python objects are never loaded."""
    path = Path(path)
    try:
        images, labels = _read_arrays(path, cfg)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    except MemoryError:
        raise InputError(f"cannot read {path}: not enough memory for its arrays; pass fewer images") from None
    try:
        return ImageData(_array_images(images, cfg, path), _array_labels(labels, len(images), path), str(path))
    except MemoryError:
        raise InputError(f"cannot preprocess {path}: not enough memory for its images; pass fewer") from None


def _check_images(shape: tuple[int, ...], dtype: np.dtype, cfg: PreprocessConfig, path: Path) -> bool:
    """Whether images of ``shape`` and ``dtype`` are uint8 channels-first (to be transposed), or
    :class:`InputError` saying why they cannot be the model's images."""
    if dtype == np.uint8:
        channels_first = len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3, 4)
        if channels_first:
            shape = (shape[0], shape[2], shape[3], shape[1])
        if len(shape) not in (3, 4) or shape[0] == 0:
            raise InputError(f"{path}: uint8 images must be N×H×W or N×H×W×C with N ≥ 1, got shape {shape}")
        if len(shape) == 3 and shape[2] in (3, 4) and shape[1] > 4:
            # N×H×W with a width of 3 or 4 pixels is no image set anyone has: this is one H×W×C image
            raise InputError(f"{path}: shape {shape} reads as {shape[0]} grey images {shape[1]} "
                             f"× {shape[2]} pixels; for one colour image save it as 1×H×W×C "
                             "(image[None])")
        return channels_first
    if np.issubdtype(dtype, np.floating):
        want = tuple(cfg.input_size)
        if len(shape) != 4 or tuple(shape[1:]) != want or shape[0] == 0:
            c, h, w = want
            hint = "; it looks channels-last: transpose it to N×C×H×W" if tuple(shape[1:]) == (h, w, c) else ""
            raise InputError(f"{path}: float arrays are preprocessed model input and must be N×{c}×{h}×{w}, "
                             f"got shape {shape}{hint}")
        return False
    raise InputError(f"{path}: images must be uint8 (raw pixels) or float (preprocessed), got {dtype}")


def _array_images(images: np.ndarray, cfg: PreprocessConfig, path: Path) -> torch.Tensor:
    channels_first = _check_images(images.shape, images.dtype, cfg, path)
    if images.dtype == np.uint8:
        if channels_first:
            images = images.transpose(0, 2, 3, 1)
        return preprocess_images(images, cfg)
    bad, shown = nonfinite_images(images)
    if bad:
        raise InputError(f"{path}: float images contain NaN or infinite values (image {shown}; "
                         f"{len(bad)} of {len(images)})")
    _warn_unnormalised(images, cfg, path)
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def nonfinite_images(images) -> tuple[list[int], str]:
    """Indices of the images (first axis; a numpy array or a torch tensor) holding NaN or Inf, and the first
    five of them as a message lists them ("3, 5" / "0, 1, 2, 3, 4, …")."""
    flat = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images).reshape(len(images), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1)).tolist()
    return bad, ", ".join(map(str, bad[:5])) + (", …" if len(bad) > 5 else "")


def _warn_unnormalised(images: np.ndarray, cfg: PreprocessConfig, path: Path) -> None:
    """Warn when float images look like raw pixels rather than the model's normalised input.

    Normalised input ``(x/255 − mean) / std`` of real images has negative values (below-mean pixels) and
    stays within about ±1/std; pixels scaled to [0, 1] or left at 0 … 255 have neither property.
    """
    lo, hi = float(images.min()), float(images.max())
    reach = (1.0 + max(cfg.mean)) / min(cfg.std)  # the largest |value| normalised input can take
    if hi > 2 * reach:
        what = "like 0 … 255 pixels"
    elif lo >= 0.0 and hi <= 1.0 and any(m > 0 for m in cfg.mean):
        what = "like pixels scaled to [0, 1] without the mean / std"
    else:
        return
    warnings.warn(f"{path}: float arrays are used as they are, as the model's normalised input ((x/255 − mean) "
                  f"/ std, mean {cfg.mean}, std {cfg.std}), but these values run {lo:.3g} … {hi:.3g}, {what}; "
                  "pass raw uint8 pixels to have them preprocessed", DataWarning, stacklevel=3)


def _check_labels(shape: tuple[int, ...], dtype: np.dtype, count: int, path: Path) -> None:
    if not np.issubdtype(dtype, np.integer) or tuple(shape) != (count,):
        raise InputError(f"{path}: labels must be {count} integers, got {dtype} of shape {tuple(shape)}")


def _array_labels(labels: np.ndarray | None, count: int, path: Path) -> torch.Tensor | None:
    if labels is None:
        return None
    _check_labels(labels.shape, labels.dtype, count, path)
    if count and labels.min() < 0:
        raise InputError(f"{path}: labels must be non-negative")
    return torch.from_numpy(labels.astype(np.int64))


def read_images(path: str | os.PathLike, cfg: PreprocessConfig, on_bad_image: str = "skip") -> ImageData:
    """Read a folder, an image file, or a ``.npy`` / ``.npz`` file, chosen by what ``path`` is."""
    _check_on_bad(on_bad_image)
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, cfg, on_bad_image)
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return read_array_file(path, cfg)
    if suffix in IMAGE_SUFFIXES:
        return read_image_file(path, cfg)
    raise InputError(f"cannot read {path}: expected a folder of images, an image file, or a .npy / .npz file")
