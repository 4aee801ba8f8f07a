"""Real photographs for ImageNet models, offline: crops of scikit-image's bundled sample photos.

scikit-image ships a few real photographs inside its wheel (``skimage.data``; no download), which is
enough to calibrate and check an ImageNet classifier when no labelled ImageNet images are at hand.
:func:`photo_crops` cuts each photo into :data:`CROPS_PER_PHOTO` square crops (the whole photo's centre
square, the four corners and the centre at 70 %, the centre at 50 % and 35 %) and preprocesses them with
the model's :class:`~mobilequant.models.PreprocessConfig` (for ImageNet: shorter side to 256, centre
224). The photos are split into two disjoint halves, so a quantizer calibrated on one half is evaluated
on photos it has never seen:

* ``"calibration"``: astronaut, coffee, immunohistochemistry, rocket, camera, coins;
* ``"evaluation"``: chelsea (cat), hubble_deep_field, retina, stereo_motorcycle (left view), clock, moon.

12 photos × 8 crops = 96 images, 48 per half. The crops carry no labels: compare an int8 model with its
float model (top-1 agreement, float top-1 inside the int8 top-5). Grey photos are repeated to RGB by the
preprocessing. Needs ``scikit-image`` (the ``dev`` extra).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..models import IMAGENET, PreprocessConfig
from .preprocess import preprocess_images
from .readers import ImageData

__all__ = ["PHOTO_SPLITS", "CROPS_PER_PHOTO", "photo_crops", "photo_names"]

# Photo names are skimage.data loaders; "stereo_motorcycle" returns (left, right, disparity): left view.
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("astronaut", "coffee", "immunohistochemistry", "rocket", "camera", "coins"),
    "evaluation": ("chelsea", "hubble_deep_field", "retina", "stereo_motorcycle", "clock", "moon"),
}
# (side as a fraction of the photo's shorter side, centre y, centre x as fractions of the free margin)
_BOXES = (
    (1.0, 0.5, 0.5),
    (0.7, 0.0, 0.0), (0.7, 0.0, 1.0), (0.7, 1.0, 0.0), (0.7, 1.0, 1.0), (0.7, 0.5, 0.5),
    (0.5, 0.5, 0.5),
    (0.35, 0.5, 0.5),
)
CROPS_PER_PHOTO = len(_BOXES)


def photo_names(split: str) -> tuple[str, ...]:
    """The skimage.data photo names of one half ("calibration" or "evaluation")."""
    try:
        return PHOTO_SPLITS[split]
    except KeyError:
        raise UsageError(f"unknown photo split {split!r}; choose one of {', '.join(PHOTO_SPLITS)}") from None


def _load_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise InputError("the photo set needs scikit-image: pip install scikit-image") from None
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.ascontiguousarray(image)


def _crops(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    short = min(h, w)
    out = []
    for frac, fy, fx in _BOXES:
        side = max(int(round(short * frac)), 1)
        top, left = int(round((h - side) * fy)), int(round((w - side) * fx))
        out.append(image[top:top + side, left:left + side])
    return out


def photo_crops(split: str = "evaluation", cfg: PreprocessConfig = IMAGENET) -> ImageData:
    """The preprocessed crops of one half of the photos (48 images for the built-in split), no labels.

    The order is photo by photo (as in :data:`PHOTO_SPLITS`), then crop by crop; ``ImageData.source``
    names the split and the photos.
    """
    names = photo_names(split)
    crops = [crop for name in names for crop in _crops(_load_photo(name))]
    images = preprocess_images(crops, cfg)
    return ImageData(images.to(torch.float32), None, f"skimage-photos:{split}:{','.join(names)}")
