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
    * any other dtype is an error.

An unreadable image is skipped with a :class:`BadImageWarning` naming it (``on_bad_image="skip"``, the
default) or raises :class:`~mobilequant.errors.InputError` naming it (``on_bad_image="error"``).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        if count < 1:
            raise UsageError(f"image count must be at least 1, got {count}")
        return self.subset(np.arange(count, dtype=np.int64) * len(self) // count)

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


def _pick(arrays: dict[str, np.ndarray], names: tuple[str, ...], path: Path) -> np.ndarray | None:
    present = [n for n in names if n in arrays]
    if len(present) > 1:
        raise InputError(f"{path} holds both {present[0]!r} and {present[1]!r}; keep one")
    return arrays[present[0]] if present else None


def read_array_file(path: str | os.PathLike, cfg: PreprocessConfig) -> ImageData:
    """Read a ``.npy`` or ``.npz`` file of images (see the module docstring for the rules)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as loaded:
                arrays = {k: loaded[k] for k in loaded.files}
        else:
            arrays = {"images": np.load(path, allow_pickle=False)}
    except ValueError as e:
        # numpy's message for anything it cannot parse ends with advice to load the file with
        # allow_pickle=True — advice never to take with a file from elsewhere
        why = str(e)
        if "pickle" in why:
            with open(path, "rb") as f:
                npy = f.read(6) == b"\x93NUMPY"
            why = ("it holds Python objects, which are not loaded (save a plain numeric array)" if npy
                   else "not a NumPy .npy file")
        raise InputError(f"cannot read {path}: {why}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(arrays.get("images", np.empty(0)), np.ndarray):
        raise InputError(f"{path} is not a .npy array file")
    images = _pick(arrays, ("images", "x"), path)
    labels = _pick(arrays, ("labels", "y"), path)
    if images is None:
        if len(arrays) != 1:
            raise InputError(f"{path} holds {sorted(arrays)}; name the images array 'images' "
                             "(and the labels 'labels')")
        images = next(iter(arrays.values()))
    return ImageData(_array_images(images, cfg, path), _array_labels(labels, len(images), path), str(path))


def _array_images(images: np.ndarray, cfg: PreprocessConfig, path: Path) -> torch.Tensor:
    if images.dtype == np.uint8:
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)  # channels-first raw images
        if images.ndim not in (3, 4) or len(images) == 0:
            raise InputError(f"{path}: uint8 images must be N×H×W or N×H×W×C with N ≥ 1, got shape {images.shape}")
        if images.ndim == 3 and images.shape[2] in (3, 4) and images.shape[1] > 4:
            # N×H×W with a width of 3 or 4 pixels is no image set anyone has: this is one H×W×C image
            raise InputError(f"{path}: shape {images.shape} reads as {images.shape[0]} grey images {images.shape[1]} "
                             f"× {images.shape[2]} pixels; for one colour image save it as 1×H×W×C "
                             "(image[None])")
        return preprocess_images(images, cfg)
    if np.issubdtype(images.dtype, np.floating):
        want = tuple(cfg.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want or len(images) == 0:
            c, h, w = want
            hint = "; it looks channels-last: transpose it to N×C×H×W" if images.shape[1:] == (h, w, c) else ""
            raise InputError(f"{path}: float arrays are preprocessed model input and must be N×{c}×{h}×{w}, "
                             f"got shape {images.shape}{hint}")
        bad, shown = nonfinite_images(images)
        if bad:
            raise InputError(f"{path}: float images contain NaN or infinite values (image {shown}; "
                             f"{len(bad)} of {len(images)})")
        _warn_unnormalised(images, cfg, path)
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    raise InputError(f"{path}: images must be uint8 (raw pixels) or float (preprocessed), got {images.dtype}")


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


def _array_labels(labels: np.ndarray | None, count: int, path: Path) -> torch.Tensor | None:
    if labels is None:
        return None
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (count,):
        raise InputError(f"{path}: labels must be {count} integers, got {labels.dtype} of shape {labels.shape}")
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
