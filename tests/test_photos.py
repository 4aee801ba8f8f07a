"""The offline photo-crop sets (mobilequant.data.photos): two disjoint halves of real photos, preprocessed.

The 62-photo "offline" collection needs scikit-learn, matplotlib and Debian's opencv-doc, which
``scripts/install.sh --test`` (the README's test command, and CI's) installs: its tests do not skip, so a
broken install step fails them.
"""

from __future__ import annotations

import gzip
import io
import sys

import numpy as np
import torch

import pytest

from mobilequant.data import OFFLINE_PHOTO_SPLITS, PHOTO_SPLITS, Photo, photo_crops, photos, preprocess_image
from mobilequant.data.photos import CROPS_PER_PHOTO
from mobilequant.errors import InputError, UsageError
from mobilequant.models import IMAGENET


def test_halves_are_disjoint_photos():
    cal, ev = set(PHOTO_SPLITS["calibration"]), set(PHOTO_SPLITS["evaluation"])
    assert len(cal) == len(ev) == 6
    assert not cal & ev


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_crops_are_preprocessed_imagenet_inputs(split):
    data = photo_crops(split, IMAGENET)
    assert data.images.shape == (len(PHOTO_SPLITS[split]) * CROPS_PER_PHOTO, 3, 224, 224)
    assert data.images.dtype == torch.float32 and data.labels is None
    assert torch.isfinite(data.images).all()
    # normalised pixels of real photos: roughly zero-centred, inside [(0 - mean) / std, (1 - mean) / std]
    assert data.images.min() >= -2.2 and data.images.max() <= 2.7
    # every crop differs from every other (no duplicated boxes or photos)
    flat = data.images.flatten(1)
    distances = torch.cdist(flat[None], flat[None])[0] + torch.eye(len(flat)) * 1e9
    assert distances.min() > 1.0


def test_first_crop_of_each_photo_is_the_standard_view_of_the_whole_photo():
    # benchmarks/compare.py reports agreement on these crops alone: the photo as an ImageNet model sees it
    data = photo_crops("evaluation", IMAGENET)
    for i, photo in enumerate(photos.photo_list("evaluation")):
        standard = preprocess_image(photos._load(photo), IMAGENET)  # shorter side 256, centre 224
        crops = data.images[i * CROPS_PER_PHOTO:(i + 1) * CROPS_PER_PHOTO]
        distance = (crops - standard).abs().flatten(1).mean(1)  # normalised pixels
        # the same view, resampled along two routes (up to half a pixel apart: 0.11 on the cat's fur) ...
        assert distance[0] < 0.12, (photo.name, distance)
        # ... and no other crop is close to it
        assert distance[1:].min() > 1.4 * distance[0] and distance[1:].min() > 0.12, (photo.name, distance)


def test_unknown_split_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration, evaluation"):
        photo_crops("train")


# ---------------------------------------------------------------- the "offline" collection (62 photos)
def test_offline_halves_are_disjoint_and_keep_pairs_together():
    cal, ev = OFFLINE_PHOTO_SPLITS["calibration"], OFFLINE_PHOTO_SPLITS["evaluation"]
    assert len(cal) == len(ev) == len(set(cal)) == len(set(ev)) == 31
    assert not set(cal) & set(ev)
    # both halves mix sources
    assert {p.source for p in cal} >= {"skimage", "sklearn", "opencv-doc"}
    assert {p.source for p in ev} >= {"skimage", "sklearn", "opencv-doc"}
    # the 12 photos of the default collection are all in, the two views of one scene in one half
    default = PHOTO_SPLITS["calibration"] + PHOTO_SPLITS["evaluation"]
    assert {p.name for p in cal + ev if p.source == "skimage"} >= set(default)
    half = {p.name: split for split, ps in OFFLINE_PHOTO_SPLITS.items() for p in ps}
    for a, b in [("stereo_motorcycle", "stereo_motorcycle_right"), ("data/aloeL.jpg", "data/aloeR.jpg"),
                 ("data/leuvenA.jpg", "data/leuvenB.jpg"), ("data/basketball1.png", "data/basketball2.png"),
                 ("data/rubberwhale1.png", "data/rubberwhale2.png"), ("data/aero1.jpg", "data/aero3.jpg"),
                 ("data/graf1.png", "data/graf3.png"), ("data/left.jpg", "data/right.jpg"),
                 ("data/box.png", "data/box_in_scene.png"), ("data/ela_original.jpg", "data/ela_modified.jpg")]:
        assert half[a] == half[b], (a, b)


@pytest.fixture(scope="module")
def offline_crops():
    """photo_crops(split, IMAGENET, collection="offline") per split, read once for the module."""
    return {split: photo_crops(split, IMAGENET, collection="offline") for split in OFFLINE_PHOTO_SPLITS}


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_offline_crops_are_preprocessed_imagenet_inputs(offline_crops, split):
    data = offline_crops[split]
    assert data.images.shape == (31 * CROPS_PER_PHOTO, 3, 224, 224)
    assert data.images.dtype == torch.float32 and data.labels is None
    assert data.source.startswith(f"offline-photos:{split}:skimage:")
    assert torch.isfinite(data.images).all()
    assert data.images.min() >= -2.2 and data.images.max() <= 2.7
    # every crop differs from every other (no duplicated boxes or photos; the pairs are two views)
    flat = data.images.flatten(1)
    distances = torch.cdist(flat[None], flat[None])[0] + torch.eye(len(flat)) * 1e9
    assert distances.min() > 1.0


def test_offline_grey_photo_is_repeated_to_rgb(offline_crops):
    photo = Photo("opencv-doc", "data/basketball1.png")  # an 8-bit grey PNG
    grey = photos._load(photo)
    assert grey.dtype == np.uint8 and grey.ndim == 2
    k = OFFLINE_PHOTO_SPLITS["evaluation"].index(photo)
    crops = offline_crops["evaluation"].images[k * CROPS_PER_PHOTO:(k + 1) * CROPS_PER_PHOTO]
    mean, std = torch.tensor(IMAGENET.mean)[:, None, None], torch.tensor(IMAGENET.std)[:, None, None]
    raw = crops * std + mean  # back to [0, 1]: the three planes are equal
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_offline_missing_opencv_doc_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(photos, "OPENCV_DOC_DIR", tmp_path / "opencv-doc" / "examples")
    with pytest.raises(InputError, match="opencv-doc photos not found under .*opencv-doc/examples: "
                                         "apt-get install opencv-doc"):
        photo_crops("evaluation", collection="offline")


def test_offline_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # not importable
    with pytest.raises(InputError, match="the photo set needs scikit-learn: pip install scikit-learn"):
        photo_crops("calibration", collection="offline")


def test_offline_missing_file_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(photos, "OPENCV_DOC_DIR", tmp_path)
    with pytest.raises(InputError, match=r"opencv-doc photo .*aloeL\.jpg not found: apt-get install opencv-doc"):
        photos._load(Photo("opencv-doc", "data/aloeL.jpg"))


def test_offline_reads_a_gzipped_rgba_file_as_rgb(monkeypatch, tmp_path):
    from PIL import Image

    pixels = np.arange(4 * 6 * 4, dtype=np.uint8).reshape(4, 6, 4)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGBA").save(buf, format="PNG")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png.gz").write_bytes(gzip.compress(buf.getvalue()))  # as Debian may ship it
    monkeypatch.setattr(photos, "OPENCV_DOC_DIR", tmp_path)
    np.testing.assert_array_equal(photos._load(Photo("opencv-doc", "data/x.png")), pixels[:, :, :3])


def test_unknown_collection_is_a_usage_error():
    with pytest.raises(UsageError, match="offline, skimage|skimage, offline"):
        photo_crops("evaluation", collection="ofline")
