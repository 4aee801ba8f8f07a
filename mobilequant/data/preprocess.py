"""Raw uint8 images → the model's normalised float32 NCHW input: the one place preprocessing happens.

Geometry, from a model's :class:`~mobilequant.models.PreprocessConfig` with ``input_size = (C, H, W)``:

* ``cfg.resize = S`` (an int): the shorter side is resized to ``S`` (bilinear, antialiased when
  shrinking; Pillow), then the centre ``H×W`` is cropped (the ImageNet evaluation recipe). A crop larger
  than the resized image is padded with zeros around it.
* ``cfg.resize = None``: an image that fits inside ``H×W`` is **not resampled**; it is centred on a
  zero (black) canvas of ``H×W``. An image larger than ``H×W`` on either side is resized straight to
  ``H×W`` (bilinear, antialiased), aspect ratio not kept.
* ``cfg.resize = None`` with ``cfg.frame = (h, w)``: the size the training images had inside the input.
  An image is fitted into that frame keeping its aspect ratio (resized only when it is not already
  that size on one side and no larger on the other), then centred on the zero canvas. This is
  Fashion-MNIST's: 28×28 → 32×32 with 2 pixels of zeros on every side, pixel-exact, matching the black
  background of the data set (the shipped weights were trained this way); a 56×56 or a 32×32 image of
  an item is resized to 28×28 first, so it is framed as the training images were.

Channels are converted to ``C``: grey → RGB repeats the grey plane; RGB → grey uses the ITU-R 601
luma weights (0.299, 0.587, 0.114), as Pillow's ``convert("L")``; an alpha channel is dropped.
Finally pixels are scaled to [0, 1] and normalised per channel: ``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..models import PreprocessConfig

__all__ = ["preprocess_image", "preprocess_images", "to_layout"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_hwc(image: np.ndarray, what: str) -> np.ndarray:
    """A uint8 HW or HWC (C in 1, 2, 3, 4) array as HWC with C = 1 or 3 (alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{what}: expected an H×W or H×W×C image (C = 1, 3 or 4), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{what}: empty image of shape {image.shape}")
    if image.shape[2] == 2:  # grey + alpha
        return image[:, :, :1]
    if image.shape[2] == 4:  # RGB + alpha
        return image[:, :, :3]
    return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an HWC uint8 image with Pillow (which antialiases when shrinking)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return out.reshape(height, width, image.shape[2])


def _centre(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop and/or zero-pad an HWC image to ``height×width`` (odd margins: the extra pixel goes last)."""
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    h, w = image.shape[:2]
    src_y, dst_y = max((h - height) // 2, 0), max((height - h) // 2, 0)
    src_x, dst_x = max((w - width) // 2, 0), max((width - w) // 2, 0)
    ch, cw = min(h, height), min(w, width)
    out[dst_y:dst_y + ch, dst_x:dst_x + cw] = image[src_y:src_y + ch, src_x:src_x + cw]
    return out


def _fit(h: int, w: int, frame: Sequence[int]) -> tuple[int, int]:
    """The size of an ``h×w`` image fitted into ``frame`` (height, width), aspect ratio kept."""
    scale = min(frame[0] / h, frame[1] / w)
    if scale == 1.0:
        return h, w
    return max(min(round(h * scale), frame[0]), 1), max(min(round(w * scale), frame[1]), 1)


def _geometry(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    _, height, width = cfg.input_size
    h, w = image.shape[:2]
    if cfg.resize is None:
        if cfg.frame is not None:
            fit = _fit(h, w, cfg.frame)
            return _centre(image if fit == (h, w) else _resize(image, *fit), height, width)
        if h <= height and w <= width:
            return _centre(image, height, width)
        return _resize(image, height, width)
    scale = cfg.resize / min(h, w)
    new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
    return _centre(_resize(image, new_h, new_w), height, width)


def _channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """NHWC uint8 with C in (1, 3) → NHWC float32 in [0, 1] with ``channels`` channels."""
    x = batch.astype(np.float32)
    x /= 255.0
    have = x.shape[3]
    if have == channels:
        return x
    if channels == 1 and have == 3:
        return (x @ _LUMA)[..., None]
    if have == 1:
        return np.repeat(x, channels, axis=3)
    raise UsageError(f"cannot convert {have}-channel images to {channels} channels")


def _normalise(batch_hwc: np.ndarray | list[np.ndarray], cfg: PreprocessConfig) -> torch.Tensor:
    """NHWC uint8 (or a list of HWC uint8 of one size) → normalised float32 NCHW tensor."""
    channels = cfg.input_size[0]
    if len(cfg.mean) != channels or len(cfg.std) != channels:
        raise UsageError(f"PreprocessConfig has {channels} channels but {len(cfg.mean)} means / {len(cfg.std)} stds")
    if isinstance(batch_hwc, list):  # images may differ in channels: convert each on its own
        x = np.concatenate([_channels(im[None], channels) for im in batch_hwc])
    else:
        x = _channels(batch_hwc, channels)
    x -= np.asarray(cfg.mean, dtype=np.float32)
    x /= np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """One uint8 H×W or H×W×C image → float32 ``C×H×W`` tensor (see the module docstring)."""
    return _normalise(_geometry(_as_hwc(image, "image"), cfg)[None], cfg)[0]


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], cfg: PreprocessConfig) -> torch.Tensor:
    """A batch of uint8 images → float32 ``N×C×H×W`` tensor, normalised by ``cfg``.

    ``images`` is an N×H×W (grey) or N×H×W×C array, or a sequence of H×W / H×W×C arrays of any sizes.
    (A single image goes through :func:`preprocess_image`; a 3-D array here is always a batch.)
    """
    _, height, width = cfg.input_size
    if isinstance(images, np.ndarray) or torch.is_tensor(images):
        batch = np.asarray(images)
        if batch.dtype != np.uint8:
            raise InputError(f"expected uint8 images, got {batch.dtype}")
        if batch.ndim == 3:
            batch = batch[..., None]
        if batch.ndim != 4:
            raise InputError(f"expected an N×H×W or N×H×W×C image batch, got shape {batch.shape}")
        if len(batch) == 0:
            raise InputError("no images to preprocess")
        if batch.shape[3] not in (1, 2, 3, 4):
            raise InputError(f"expected 1, 3 or 4 channels, got an image batch of shape {batch.shape}")
        if batch.shape[3] in (2, 4):  # drop alpha
            batch = batch[..., : batch.shape[3] - 1]
        h, w = batch.shape[1:3]
        if cfg.resize is None and (_fit(h, w, cfg.frame) == (h, w) if cfg.frame is not None else
                                   h <= height and w <= width):
            # Fast path (Fashion-MNIST): pad the whole batch at once; the same result as image by image.
            top, left = (height - h) // 2, (width - w) // 2
            return _normalise(np.pad(batch, ((0, 0), (top, height - h - top), (left, width - w - left), (0, 0))), cfg)
        images = list(batch)
    if len(images) == 0:
        raise InputError("no images to preprocess")
    return _normalise([_geometry(_as_hwc(im, f"image {i}"), cfg) for i, im in enumerate(images)], cfg)


def to_layout(x: torch.Tensor | np.ndarray, layout: str) -> torch.Tensor | np.ndarray:
    """Convert an NCHW batch to ``layout`` ("NCHW": unchanged, "NHWC": channels last, contiguous)."""
    if x.ndim != 4:
        raise UsageError(f"to_layout expects a 4-D NCHW batch, got {x.ndim}-D")
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        if isinstance(x, np.ndarray):
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x.permute(0, 2, 3, 1).contiguous()
    raise UsageError(f"unknown layout {layout!r}; choose 'NCHW' or 'NHWC'")
