"""The offline photo-crop set (mobilequant.data.photos): two disjoint halves of real photos, preprocessed."""

from __future__ import annotations

import torch

import pytest

from mobilequant.data import PHOTO_SPLITS, photo_crops
from mobilequant.data.photos import CROPS_PER_PHOTO
from mobilequant.errors import UsageError
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


def test_unknown_split_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration, evaluation"):
        photo_crops("train")
