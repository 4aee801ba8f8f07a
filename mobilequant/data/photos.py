"""Real photographs for ImageNet models, offline: crops of sample photos that ship with installed packages.

No labelled ImageNet images are at hand offline, but a few real photographs ship inside packages (no
download), which is enough to calibrate and check an ImageNet classifier. :func:`photo_crops` cuts each
photo into :data:`CROPS_PER_PHOTO` square crops (the whole photo's centre square, the four corners and the
centre at 70 %, the centre at 50 % and 35 %) and preprocesses them with the model's
:class:`~mobilequant.models.PreprocessConfig` (for ImageNet: shorter side to 256, centre 224). Each
collection is split into two disjoint halves, so a quantizer calibrated on one half is evaluated on photos
it has never seen. Two collections:

``"skimage"`` (the default; :data:`PHOTO_SPLITS`): scikit-image's bundled photos (``skimage.data``),
12 photos × 8 crops = 96 images, 48 per half. Needs ``scikit-image`` (the ``dev`` extra).

* ``"calibration"``: astronaut, coffee, immunohistochemistry, rocket, camera, coins;
* ``"evaluation"``: chelsea (cat), hubble_deep_field, retina, stereo_motorcycle (left view), clock, moon.

``"offline"`` (:data:`OFFLINE_PHOTO_SPLITS`): the real photographs of scenes and objects that
scikit-image, scikit-learn, matplotlib and the Debian package ``opencv-doc`` ship, 62 photos × 8 crops =
496 images, 31 photos (248 crops) per half. Sources: scikit-image (the 12 above and the motorcycle's right
view), scikit-learn (``load_sample_image``: china, flower), matplotlib's sample data (grace_hopper) and 46
example images of ``opencv-doc`` (:data:`OPENCV_DOC_DIR`; ``apt-get install opencv-doc``). The halves
interleave sources and subjects (people, animals, food and objects, buildings and streets, landscapes,
scientific images); the two views of one scene (stereo pairs, two frames or viewpoints of one scene, a
photo and its retouched copy, the box alone and in a scene) are in the same half. Left out: from
``opencv-doc`` drawings and renders (HappyFish, ml, cards, Blender_Suzanne, fuzzy/input), logos,
synthetic shapes and masks (pic1–6, detect_blob, ellipses, gradient, mask, templ, tmpl, pca_test1,
shape/, ximgproc/), text and digit sheets (digits, imageText*, notes, text_defocus, text_motion, LR_05/06,
the scenetext word crops), the sudoku and chessboard pattern images, a painting (starry_night), the
aloe's disparity map (aloeGT) and 25 of the 26 chessboard calibration shots; from scikit-image texture
swatches (brick, grass, gravel), microscopy and fundus details beyond the 12 (cell, microaneurysms), text
(page, text), 25-pixel faces (lfw_subset), cat (= chelsea), drawings and a silhouette (logo, colorwheel,
horse) and the loaders that need a download (eagle, lily, skin, ...); from matplotlib a drawing and an
MRI slice. Needs ``scikit-image``, ``scikit-learn`` and ``matplotlib`` (the ``photos`` extra) and
``opencv-doc``; a missing one raises :class:`~mobilequant.errors.InputError` saying how to install it.

The crops carry no labels: compare an int8 model with its float model (top-1 agreement, float top-1
inside the int8 top-5). Grey photos are repeated to RGB by the preprocessing.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, UsageError, did_you_mean
from ..models import IMAGENET, PreprocessConfig
from .preprocess import preprocess_images
from .readers import ImageData, _decode

__all__ = ["CROPS_PER_PHOTO", "OFFLINE_PHOTO_SPLITS", "OPENCV_DOC_DIR", "PHOTO_COLLECTIONS", "PHOTO_SPLITS",
           "Photo", "photo_crops", "photo_list", "photo_names"]

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

# Where Debian's opencv-doc puts its example images (read at call time, so tests can point elsewhere).
OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc/examples")
_INSTALL = {
    "skimage": "pip install scikit-image",
    "sklearn": "pip install scikit-learn",
    "matplotlib": "pip install matplotlib",
    "opencv-doc": "apt-get install opencv-doc",
}


@dataclass(frozen=True)
class Photo:
    """One offline photo: the package it ships with and its name there.

    ``name`` is, per ``source``: ``"skimage"`` a ``skimage.data`` loader; ``"sklearn"`` a file of
    ``sklearn.datasets.load_sample_image``; ``"matplotlib"`` a file of matplotlib's ``sample_data``;
    ``"opencv-doc"`` a path under :data:`OPENCV_DOC_DIR`.
    """

    source: str
    name: str

    def __post_init__(self) -> None:
        if self.source not in _INSTALL:
            raise ValueError(f"unknown photo source {self.source!r}; one of {', '.join(_INSTALL)}")

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _sk(*names: str) -> tuple[Photo, ...]:
    return tuple(Photo("skimage", n) for n in names)


def _cv(*names: str) -> tuple[Photo, ...]:
    return tuple(Photo("opencv-doc", n if "/" in n else f"data/{n}") for n in names)


# Pairs (two views of one scene) stay together in one half; the comments name the subjects.
OFFLINE_PHOTO_SPLITS: dict[str, tuple[Photo, ...]] = {
    "calibration": (
        *_sk("astronaut", "coffee", "immunohistochemistry", "hubble_deep_field", "coins", "rocket"),
        Photo("sklearn", "china.jpg"),  # a temple
        *_cv("messi5.jpg", "left01.jpg"),  # people (left01: one chessboard calibration shot)
        *_cv("baboon.jpg", "chicky_512.png", "butterfly.jpg"),  # animals
        *_cv("apple.jpg", "fruits.jpg", "board.jpg", "stuff.jpg", "licenseplate_motion.jpg"),  # food, objects
        *_cv("box.png", "box_in_scene.png"),  # a cookie box alone and in a scene
        *_cv("left.jpg", "right.jpg"),  # books, stereo pair
        *_cv("aloeL.jpg", "aloeR.jpg"),  # potted aloe, stereo pair
        *_cv("building.jpg", "home.jpg", "hfs/data/001.jpg"),  # buildings, a lake
        *_cv("aero1.jpg", "aero3.jpg"),  # aerial views of one town
        *_cv("text/scenetext01.jpg", "text/scenetext03.jpg", "text/scenetext05.jpg"),  # street scenes
    ),
    "evaluation": (
        *_sk("camera", "chelsea", "retina", "moon", "clock", "stereo_motorcycle", "stereo_motorcycle_right"),
        Photo("sklearn", "flower.jpg"),
        Photo("matplotlib", "grace_hopper.jpg"),  # a portrait
        *_cv("basketball1.png", "basketball2.png"),  # two people, two frames
        *_cv("squirrel_cls.jpg", "hfs/data/000.jpg", "dnn_superres/butterfly.png"),  # animals
        *_cv("orange.jpg", "smarties.png", "blox.jpg", "alphamat/input_images/plant.jpg"),  # food, objects
        *_cv("rubberwhale1.png", "rubberwhale2.png"),  # toys, two frames
        *_cv("ela_original.jpg", "ela_modified.jpg"),  # a notebook and its retouched copy
        *_cv("leuvenA.jpg", "leuvenB.jpg"),  # a street, two exposures
        *_cv("graf1.png", "graf3.png"),  # a graffiti wall, two viewpoints
        *_cv("reg/home.png", "hfs/data/002.jpg"),  # a house, a tree in a field
        *_cv("text/scenetext02.jpg", "text/scenetext04.jpg", "text/scenetext06.jpg"),  # street scenes
    ),
}
PHOTO_COLLECTIONS = ("skimage", "offline")


def photo_names(split: str) -> tuple[str, ...]:
    """The skimage.data photo names of one half ("calibration" or "evaluation") of the default collection."""
    try:
        return PHOTO_SPLITS[split]
    except KeyError:
        raise UsageError(f"unknown photo split {split!r}; choose one of {', '.join(PHOTO_SPLITS)}") from None


def photo_list(split: str, collection: str = "skimage") -> tuple[Photo, ...]:
    """The photos of one half ("calibration" or "evaluation") of a collection ("skimage" or "offline")."""
    if collection == "skimage":
        return _sk(*photo_names(split))
    if collection != "offline":
        raise UsageError(f"unknown photo collection {collection!r}; choose one of "
                         f"{', '.join(PHOTO_COLLECTIONS)}{did_you_mean(collection, PHOTO_COLLECTIONS)}")
    try:
        return OFFLINE_PHOTO_SPLITS[split]
    except KeyError:
        raise UsageError(f"unknown photo split {split!r}; choose one of {', '.join(OFFLINE_PHOTO_SPLITS)}") from None


# skimage photos that are not a loader of their own: (loader, element of the tuple it returns)
_SKIMAGE_VIEWS = {"stereo_motorcycle_right": ("stereo_motorcycle", 1)}


def _load_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise InputError("the photo set needs scikit-image: pip install scikit-image") from None
    loader, view = _SKIMAGE_VIEWS.get(name, (name, 0))
    image = getattr(skimage.data, loader)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[view]
    return np.ascontiguousarray(image)


def _missing(what: str, source: str) -> InputError:
    return InputError(f"{what}: {_INSTALL[source]}")


def _read_file(path: Path, source: str) -> np.ndarray:
    """A photo file as uint8 HW (grey) or HWC (RGB); Debian may have gzipped it (``name.gz``)."""
    if path.is_file():
        return _decode(path)
    if path.with_name(path.name + ".gz").is_file():
        with gzip.open(path.with_name(path.name + ".gz")) as f:
            return _decode(io.BytesIO(f.read()))
    raise _missing(f"{source} photo {path} not found", source)


def _load(photo: Photo) -> np.ndarray:
    """One photo's pixels, uint8 HW or HWC; nothing is downloaded."""
    if photo.source == "skimage":
        return _load_photo(photo.name)
    if photo.source == "sklearn":
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            raise _missing("the photo set needs scikit-learn", "sklearn") from None
        return np.ascontiguousarray(load_sample_image(photo.name))
    if photo.source == "matplotlib":
        try:
            import matplotlib
        except ImportError:
            raise _missing("the photo set needs matplotlib", "matplotlib") from None
        return _read_file(Path(matplotlib.get_data_path()) / "sample_data" / photo.name, "matplotlib")
    return _read_file(OPENCV_DOC_DIR / photo.name, "opencv-doc")


def _check_sources(chosen: tuple[Photo, ...]) -> None:
    """Fail before reading anything when a whole source is missing (one line, with the install command)."""
    import importlib.util

    sources = {p.source for p in chosen}
    for source in ("skimage", "sklearn", "matplotlib"):
        if source in sources and importlib.util.find_spec(source) is None:
            raise _missing(f"the photo set needs {_INSTALL[source].split()[-1]}", source)
    if "opencv-doc" in sources and not OPENCV_DOC_DIR.is_dir():
        raise _missing(f"opencv-doc photos not found under {OPENCV_DOC_DIR}", "opencv-doc")


def _crops(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    short = min(h, w)
    out = []
    for frac, fy, fx in _BOXES:
        side = max(int(round(short * frac)), 1)
        top, left = int(round((h - side) * fy)), int(round((w - side) * fx))
        out.append(image[top:top + side, left:left + side])
    return out


def photo_crops(split: str = "evaluation", cfg: PreprocessConfig = IMAGENET, collection: str = "skimage") -> ImageData:
    """The preprocessed crops of one half of a photo collection, no labels.

    ``collection="skimage"`` (48 images per half) or ``"offline"`` (248 per half). The order is photo by
    photo (as in :data:`PHOTO_SPLITS` / :data:`OFFLINE_PHOTO_SPLITS`), then crop by crop, each photo's
    :data:`CROPS_PER_PHOTO` crops starting with the whole photo's centre square (which the ImageNet
    preprocessing turns into the standard view of the photo: shorter side 256, centre 224);
    ``ImageData.source`` names the collection, the split and the photos.
    """
    chosen = photo_list(split, collection)
    _check_sources(chosen)
    crops = [crop for photo in chosen for crop in _crops(_load(photo))]
    images = preprocess_images(crops, cfg)
    names = ",".join(p.name if collection == "skimage" else str(p) for p in chosen)
    return ImageData(images.to(torch.float32), None, f"{collection}-photos:{split}:{names}")
