"""Built-in data: Fashion-MNIST from the Debian package and the calibration subset shipped with mobilequant.

``load_data(spec, cfg, split)`` is what the export job and the CLI call: ``spec`` is ``"builtin"`` or
``"fashion-mnist"`` (split ``"calibration"``: the shipped 512-image subset, needs nothing installed;
``"train"`` / ``"test"``: the full Debian-packaged splits), or a path read by
:func:`~mobilequant.data.readers.read_images`.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, UsageError, did_you_mean
from ..models import FASHION_MNIST, PreprocessConfig
from .fashion_mnist import CLASSES, load_fashion_mnist
from .preprocess import preprocess_images
from .readers import ImageData, read_images, spread_indices

__all__ = ["BUILTIN_DATASETS", "CALIBRATION_DIR", "SPLITS", "builtin_dataset", "calibration_manifest",
           "calibration_set", "load_data", "stratified_indices"]

BUILTIN_DATASETS = ("fashion-mnist",)
_ALIASES = {"builtin": "fashion-mnist", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}
SPLITS = ("calibration", "train", "test")
# The shipped calibration sets live in the repository's top-level ``calibration/`` (next to their manifests
# and README); MOBILEQUANT_CALIBRATION_DIR points elsewhere (e.g. for a non-editable install).
CALIBRATION_DIR = Path(os.environ.get("MOBILEQUANT_CALIBRATION_DIR",
                                      Path(__file__).resolve().parents[2] / "calibration"))
_CALIBRATION_FILES = {"fashion-mnist": "fashion-mnist-512"}


def _dataset_name(name: str) -> str:
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown built-in data set {name!r}{did_you_mean(name, _ALIASES)}; "
                         f"built-in: {', '.join(BUILTIN_DATASETS)}") from None


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices into ``labels``, stratified by class, drawn without replacement; sorted ascending.

    Every class present gets ``count // k`` indices (k classes); the ``count % k`` left over go one each
    to the lowest class ids. Within a class the draw is ``numpy.random.default_rng(seed).choice``, one
    class after another in class order, so the same labels and seed give the same indices everywhere.
    """
    classes = np.unique(labels)
    base, extra = divmod(count, len(classes))
    rng = np.random.default_rng(seed)
    picked = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        n = base + (1 if i < extra else 0)
        if n > len(members):
            raise ValueError(f"class {c} has {len(members)} samples, {n} requested")
        picked.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def builtin_dataset(name: str = "fashion-mnist", split: str = "test", cfg: PreprocessConfig = FASHION_MNIST,
                    root: str | os.PathLike | None = None, limit: int | None = None) -> ImageData:
    """A built-in split ("train" or "test"), preprocessed with ``cfg``; with ``limit``, the images
    :meth:`ImageData.spread` would pick, chosen before preprocessing (at 3×224×224 the 10k test images
    take 6 GB as float32, and the whole split had been preprocessed for a ``--num-eval 32``)."""
    name = _dataset_name(name)
    images, labels = load_fashion_mnist(split, root)
    if limit is not None and limit < len(images):
        picked = spread_indices(len(images), limit)  # as ImageData.spread picks
        images, labels = images[picked], labels[picked]
    return ImageData(preprocess_images(images, cfg), torch.from_numpy(labels), f"{name}:{split}", CLASSES)


def is_builtin(spec) -> bool:
    """Whether a data spec names the built-in data set (``builtin``, ``fashion-mnist``)."""
    return isinstance(spec, str) and spec.lower() in _ALIASES


@lru_cache(maxsize=None)
def calibration_manifest(name: str = "fashion-mnist") -> dict:
    """The JSON manifest of the shipped calibration subset (source, indices, seed, sha256, ...)."""
    path = CALIBRATION_DIR / f"{_CALIBRATION_FILES[_dataset_name(name)]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the calibration manifest {path}: {e}; reinstall mobilequant") from None


def _calibration_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    manifest = calibration_manifest(name)
    path = CALIBRATION_DIR / manifest["file"]
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the shipped calibration set {path}: {e}; reinstall mobilequant") from None
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise InputError(f"{path} does not match the sha256 in its manifest; reinstall mobilequant")
    with np.load(path, allow_pickle=False) as npz:
        return npz["images"], npz["labels"].astype(np.int64)


def calibration_set(name: str = "fashion-mnist", cfg: PreprocessConfig = FASHION_MNIST) -> ImageData:
    """The calibration subset shipped inside the package (512 Fashion-MNIST training images), preprocessed."""
    name = _dataset_name(name)
    images, labels = _calibration_arrays(name)
    return ImageData(preprocess_images(images, cfg), torch.from_numpy(labels), f"{name}:calibration", CLASSES)


def load_data(spec: str | os.PathLike, cfg: PreprocessConfig, split: str | None = None,
              on_bad_image: str = "skip", limit: int | None = None) -> ImageData:
    """Resolve a data spec: a built-in name ("builtin", "fashion-mnist") with ``split``, or a path.

    ``split`` is "calibration", "train" or "test" for built-in data (required there) and is ignored for
    a path.
    """
    if isinstance(spec, str) and spec.lower() in _ALIASES:
        if split is None:
            raise UsageError(f"built-in data {spec!r} needs a split: one of {', '.join(SPLITS)}")
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if split == "calibration":
            data = calibration_set(spec, cfg)
        else:
            return builtin_dataset(spec, split, cfg, limit=limit)
    else:
        if not Path(spec).exists() and isinstance(spec, str) and did_you_mean(spec.lower(), _ALIASES):
            raise InputError(f"no such file or folder: {spec}{did_you_mean(spec.lower(), _ALIASES)}")
        data = read_images(spec, cfg, on_bad_image)
    return data if limit is None else data.spread(limit)
