"""Fashion-MNIST read straight from its IDX files (no downloader).

The files come from the Debian package ``dataset-fashion-mnist``, which installs
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under ``/usr/share/datasets/fashion-mnist``.
Another folder holding the same files can be named with the environment variable
``MOBILEQUANT_FASHION_MNIST`` or the ``root`` argument. Uncompressed copies (the same names without
``.gz``) are read as well.

Fashion-MNIST is (c) 2017 Zalando SE, MIT licence (https://github.com/zalandoresearch/fashion-mnist).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError

__all__ = ["CLASSES", "DEFAULT_ROOT", "ENV_VAR", "fashion_mnist_root", "load_fashion_mnist", "read_idx"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MOBILEQUANT_FASHION_MNIST"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIZES = {"train": 60_000, "test": 10_000}
_INSTALL_HINT = f"install it with `apt-get install dataset-fashion-mnist` or set {ENV_VAR} to a folder holding the IDX files"

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder read: ``root``, else ``$MOBILEQUANT_FASHION_MNIST``, else the Debian package's folder."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in ``.gz``) into an array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError on truncation
        raise InputError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != header + count * dtype.itemsize:
        raise InputError(f"{path}: IDX header says shape {shape} but the file holds "
                         f"{len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"Fashion-MNIST not found: no {stem}.gz in {folder}; {_INSTALL_HINT}")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 ``N×28×28`` and int64 ``N`` (N = 60,000 for "train", 10,000 for "test")."""
    if split not in _FILES:
        raise UsageError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    folder = fashion_mnist_root(root)
    image_file, label_file = (_find(folder, stem) for stem in _FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise InputError(f"{image_file}: expected uint8 N×28×28 images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"{label_file}: expected {len(images)} labels, got shape {labels.shape}")
    if len(images) != _SIZES[split]:
        raise InputError(f"{image_file}: expected {_SIZES[split]} images for split {split!r}, got {len(images)}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise InputError(f"{label_file}: labels outside 0..{len(CLASSES) - 1}")
    return images, labels
