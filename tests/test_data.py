"""mobilequant.data: the Fashion-MNIST IDX reader, preprocessing, user data readers, the shipped calibration set.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (installed by scripts/install.sh);
these tests need it and fail, rather than skip, without it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mobilequant.data import (
    BadImageWarning,
    ImageData,
    LabelWarning,
    builtin_dataset,
    calibration_manifest,
    calibration_set,
    fit_labels,
    load_data,
    load_fashion_mnist,
    preprocess_image,
    preprocess_images,
    read_images,
    stratified_indices,
    to_layout,
)
from mobilequant.data import builtin as builtin_mod
from mobilequant.data.readers import DataWarning
from mobilequant.data.fashion_mnist import ENV_VAR, fashion_mnist_root, read_idx
from mobilequant.errors import InputError, UsageError
from mobilequant.models import FASHION_MNIST, IMAGENET, PreprocessConfig

MEAN, STD = FASHION_MNIST.mean[0], FASHION_MNIST.std[0]


@pytest.fixture(scope="module")
def train_split():
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


# --- IDX reader -----------------------------------------------------------------------------------------

def test_idx_reader_sizes_and_labels(train_split, test_split):
    for (images, labels), n in ((train_split, 60_000), (test_split, 10_000)):
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 9
        assert np.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is exactly balanced
        assert images.max() == 255 and images.min() == 0


def test_read_idx_roundtrip_and_bad_files(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    header = bytes([0, 0, 0x08, 3]) + np.array(a.shape, dtype=">u4").tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(header + a.tobytes()))
    (tmp_path / "a-idx3-ubyte").write_bytes(header + a.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), a)
    (tmp_path / "short").write_bytes(header + a.tobytes()[:-1])
    with pytest.raises(InputError, match="IDX header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04" + a.tobytes())
    with pytest.raises(InputError, match="bad magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read IDX file"):
        read_idx(tmp_path / "broken.gz")


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert fashion_mnist_root() == tmp_path
    with pytest.raises(InputError) as e:
        load_fashion_mnist("test")
    message = str(e.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and ENV_VAR in message and str(tmp_path) in message
    with pytest.raises(UsageError, match="split"):
        load_fashion_mnist("validation")


def test_env_var_points_at_another_copy(tmp_path, monkeypatch, test_split):
    real = fashion_mnist_root()  # where the suite reads it from (the Debian folder unless the env var is set)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(real / name)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    images, labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(images, test_split[0])
    np.testing.assert_array_equal(labels, test_split[1])


# --- preprocessing ----------------------------------------------------------------------------------------

def test_fashion_mnist_is_zero_padded_to_32_and_normalised(test_split):
    raw = test_split[0][:64]
    x = preprocess_images(raw, FASHION_MNIST)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    background = (0.0 - MEAN) / STD
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    edge = x[:, 0][:, border]
    torch.testing.assert_close(edge, torch.full_like(edge, background), rtol=0, atol=1e-6)
    expected = (torch.from_numpy(raw).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], expected, rtol=0, atol=1e-6)
    # The batch fast path, the list path and the single-image path agree exactly.
    assert torch.equal(preprocess_images(list(raw), FASHION_MNIST), x)
    assert torch.equal(preprocess_image(raw[5], FASHION_MNIST), x[5])


def test_channel_conversion():
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    grey = preprocess_image(rgb, FASHION_MNIST)
    luma = (0.299 * 200 + 0.587 * 100) / 255
    assert grey.shape == (1, 32, 32)
    assert grey[0, 16, 16].item() == pytest.approx((luma - MEAN) / STD, abs=1e-5)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 7, np.uint8)], axis=2)
    assert torch.equal(preprocess_image(rgba, FASHION_MNIST), grey)  # alpha is dropped
    plain = np.full((28, 28), 51, dtype=np.uint8)
    x = preprocess_image(plain, IMAGENET)  # grey → 3 channels, each with its own mean / std
    assert x.shape == (3, 224, 224)
    for c in range(3):
        assert x[c, 112, 112].item() == pytest.approx((0.2 - IMAGENET.mean[c]) / IMAGENET.std[c], abs=1e-5)


def test_resize_shorter_side_then_centre_crop():
    cfg = PreprocessConfig(input_size=(1, 32, 32), mean=(0.0,), std=(1.0,), resize=32)
    # 40×80: left 40 columns black, right 40 white; shorter side → 32 gives 32×64; the centre 32 columns
    # are 16 black then 16 white.
    image = np.zeros((40, 80), dtype=np.uint8)
    image[:, 40:] = 255
    x = preprocess_image(image, cfg)[0]
    assert x.shape == (32, 32)
    assert torch.all(x[:, :15] == 0) and torch.all(x[:, 17:] == 1)
    # resize=None (no frame) and an image larger than the input: resized straight to it (antialiased, so a
    # constant image stays constant).
    big = np.full((100, 60, 3), 128, dtype=np.uint8)
    y = preprocess_image(big, dataclasses.replace(FASHION_MNIST, frame=None))
    assert y.shape == (1, 32, 32)
    torch.testing.assert_close(y, torch.full_like(y, (128 / 255 - MEAN) / STD), rtol=0, atol=1e-5)
    # Mixed sizes in one list.
    z = preprocess_images([np.zeros((28, 28), np.uint8), big, image], FASHION_MNIST)
    assert z.shape == (3, 1, 32, 32)


def test_fashion_frame_fits_other_sizes_as_the_training_images_were_framed():
    # Fashion-MNIST's items are 28×28 on a 32×32 zero canvas; an image of another size is fitted into the
    # 28×28 frame (aspect kept), then padded — not stretched over the whole canvas.
    big = np.full((100, 60), 128, dtype=np.uint8)
    y = preprocess_image(big, FASHION_MNIST)[0]
    inside = (y - (0 - MEAN) / STD).abs() > 1e-5
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (2, 30, 7, 24)  # 28 × 17 in the middle
    assert y[16, 16].item() == pytest.approx((128 / 255 - MEAN) / STD, abs=1e-5)
    # a real item scaled up to 56×56 comes back to (nearly) its 28×28 framing; stretched over 32×32 it
    # would not
    item = load_fashion_mnist("test")[0][0]
    up = np.asarray(Image.fromarray(item).resize((56, 56), Image.Resampling.BILINEAR))
    framed, original = preprocess_images(up[None], FASHION_MNIST), preprocess_images(item[None], FASHION_MNIST)
    stretched = preprocess_images(up[None], dataclasses.replace(FASHION_MNIST, frame=None))
    assert (framed - original).abs().mean().item() < 0.5 * (stretched - original).abs().mean().item()
    # a batch of one size (the fast path) and a list give the same tensor
    torch.testing.assert_close(framed, preprocess_images([up], FASHION_MNIST))


def test_preprocess_rejects_bad_input():
    with pytest.raises(InputError, match="uint8"):
        preprocess_images(np.zeros((2, 28, 28), dtype=np.float32), FASHION_MNIST)
    with pytest.raises(InputError, match="shape"):
        preprocess_image(np.zeros((28, 28, 5), dtype=np.uint8), FASHION_MNIST)
    with pytest.raises(InputError, match="no images"):
        preprocess_images([], FASHION_MNIST)


def test_to_layout():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    y = to_layout(x, "NHWC")
    assert y.shape == (2, 4, 5, 3) and y.is_contiguous()
    assert y[1, 2, 3, 1] == x[1, 1, 2, 3]
    assert to_layout(x, "NCHW") is x
    assert to_layout(x.numpy(), "NHWC").shape == (2, 4, 5, 3)
    with pytest.raises(UsageError):
        to_layout(x, "CHWN")


# --- ImageData ------------------------------------------------------------------------------------------

def test_spread_takes_images_from_the_whole_set():
    data = ImageData(torch.randn(10, 1, 4, 4), torch.arange(10) // 5, "t")  # class-sorted, like a folder
    assert data.spread(4).labels.tolist() == [0, 0, 1, 1]  # not the first four, all of class 0
    assert torch.equal(data.spread(4).images, data.images[[0, 2, 5, 7]])
    assert data.spread(10) is data and data.spread(99) is data
    with pytest.raises(UsageError):
        data.spread(0)


class _Classifier(torch.nn.Module):
    def __init__(self, classes, names=None):
        super().__init__()
        self.fc = torch.nn.Linear(16, classes)
        if names is not None:
            self.class_names = names

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_folder_labels_are_fitted_to_the_model(tmp_path):
    def folder(*names):
        root = tmp_path / "_".join(names)
        for i, n in enumerate(names):
            _png(root / n / "x.png", np.full((4, 4), 10 * i, np.uint8))
        return read_images(root, PreprocessConfig(input_size=(1, 4, 4), mean=(0.5,), std=(0.5,), resize=None))

    names = ("T-shirt/top", "Trouser", "Pullover", "Dress")
    # by the model's class names: a subset of the classes, spelt as a file system allows
    data = fit_labels(folder("dress", "Trouser", "t-shirt_top"), _Classifier(4, names))
    assert data.classes == ("Trouser", "dress", "t-shirt_top") and data.labels.tolist() == [1, 3, 0]
    # by class index: "2" and "10" are classes 2 and 10, not sorted positions
    assert fit_labels(folder("10", "2"), _Classifier(12)).labels.tolist() == [10, 2]
    with pytest.raises(InputError, match="class folder '10' is a class index but the model has 4"):
        fit_labels(folder("10", "2"), _Classifier(4))
    # one folder per class: sorted position, as torchvision's ImageFolder numbers them
    assert fit_labels(folder("cat", "dog"), _Classifier(2)).labels.tolist() == [0, 1]
    # … unless the model names its classes and these are not them ("class1" … "class10" would sort
    # class10 second)
    with pytest.warns(LabelWarning, match="neither the model's 2 classes by name nor class indices;"):
        assert fit_labels(folder("cat", "dog"), _Classifier(2, ("bird", "fish"))).labels is None
    # anything else cannot be trusted: labels dropped, with a warning naming the folders
    with pytest.warns(LabelWarning, match="2 class folder\\(s\\) \\(cat, dog\\)"):
        assert fit_labels(folder("cat", "dog"), _Classifier(10)).labels is None
    # a dense output (segmentation) takes no image labels
    class Dense(torch.nn.Module):
        def forward(self, x):
            return x.repeat(1, 3, 1, 1)

    with pytest.warns(LabelWarning, match="output is N×3×4×4, not N × classes"):
        assert fit_labels(folder("cat", "dog"), Dense()).labels is None
    # array labels outside the model's classes fail before any work
    with pytest.raises(InputError, match="run from 0 to 3 but the model has 3 classes"):
        fit_labels(ImageData(torch.zeros(4, 1, 4, 4), torch.arange(4), "arr.npz"), _Classifier(3))


def test_image_data_batches_and_subset():
    data = ImageData(torch.randn(10, 1, 4, 4), torch.arange(10), "t")
    assert len(data) == 10 and data.input_size == (1, 4, 4)
    batches = list(data.batches(4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    sub = data.subset([7, 2])
    assert torch.equal(sub.labels, torch.tensor([7, 2])) and torch.equal(sub.images[0], data.images[7])
    assert len(data.subset(slice(0, 3))) == 3
    with pytest.raises(UsageError):
        data.subset([10])
    unlabelled = ImageData(torch.randn(3, 1, 4, 4), None, "u")
    assert all(y is None for _, y in unlabelled.batches(2))
    with pytest.raises(ValueError):
        ImageData(torch.randn(3, 1, 4, 4), torch.arange(2), "bad")


# --- user data: folders ---------------------------------------------------------------------------------

def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    b = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    c = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    _png(tmp_path / "sneaker" / "b.png", b)
    _png(tmp_path / "sneaker" / "a.png", a)
    _png(tmp_path / "bag" / "nested" / "c.png", c)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sneaker" / ".hidden.png").write_bytes(b"ignored")
    data = read_images(tmp_path, FASHION_MNIST)
    assert data.classes == ("bag", "sneaker")
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images.shape == (3, 1, 32, 32)
    assert torch.equal(data.images[0], preprocess_image(c, FASHION_MNIST))
    assert torch.equal(data.images[1], preprocess_image(a, FASHION_MNIST))  # sorted: a before b
    assert torch.equal(data.images[2], preprocess_image(b, FASHION_MNIST))


def test_folder_corrupt_image_skipped_with_warning_or_error(tmp_path):
    _png(tmp_path / "good.png", np.full((28, 28), 9, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(BadImageWarning, match="broken.png"):
        data = read_images(tmp_path, FASHION_MNIST, on_bad_image="skip")
    assert len(data) == 1 and data.labels is None
    with pytest.raises(InputError, match="broken.png"):
        read_images(tmp_path, FASHION_MNIST, on_bad_image="error")
    with pytest.raises(UsageError):
        read_images(tmp_path, FASHION_MNIST, on_bad_image="ignore")


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no images"):
        read_images(tmp_path, FASHION_MNIST)
    (tmp_path / "only.png").write_bytes(b"junk")
    with pytest.warns(BadImageWarning), pytest.raises(InputError, match="could be read"):
        read_images(tmp_path, FASHION_MNIST)
    _png(tmp_path / "cls" / "x.png", np.zeros((28, 28), np.uint8))
    with pytest.raises(InputError, match="mixes class sub-folders"):
        read_images(tmp_path, FASHION_MNIST)
    with pytest.raises(InputError, match="no such file"):
        read_images(tmp_path / "missing", FASHION_MNIST)


def test_folder_follows_linked_folders_once_and_exif_orientation(tmp_path):
    _png(tmp_path / "elsewhere" / "x.png", np.zeros((28, 28), np.uint8))
    (tmp_path / "set" / "a").mkdir(parents=True)
    _png(tmp_path / "set" / "a" / "own.png", np.zeros((28, 28), np.uint8))
    (tmp_path / "set" / "a" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "set" / "a" / "loop").symlink_to(tmp_path / "set")  # a link up the tree: walked once
    data = read_images(tmp_path / "set", FASHION_MNIST)
    assert len(data) == 2 and data.classes == ("a",)
    # a phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to show)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :4] = 255  # a white stripe on the left edge as stored: on the top edge as shown
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    shown = read_images(tmp_path / "sideways.jpg", dataclasses.replace(FASHION_MNIST, frame=None))
    rows = (shown.images[0, 0] > 0).any(1).nonzero().flatten()
    assert shown.images.shape == (1, 1, 32, 32) and rows.max() < 16  # the stripe is at the top


def test_single_image_file(tmp_path):
    _png(tmp_path / "one.png", np.full((28, 28), 255, np.uint8))
    data = load_data(str(tmp_path / "one.png"), FASHION_MNIST, "calibration")
    assert data.images.shape == (1, 1, 32, 32) and data.labels is None


# --- user data: arrays ----------------------------------------------------------------------------------

def test_npy_and_npz(tmp_path, test_split):
    raw, labels = test_split[0][:20], test_split[1][:20]
    expected = preprocess_images(raw, FASHION_MNIST)
    np.save(tmp_path / "raw.npy", raw)
    assert torch.equal(read_images(tmp_path / "raw.npy", FASHION_MNIST).images, expected)
    np.savez(tmp_path / "raw.npz", images=raw, labels=labels.astype(np.int32))
    data = read_images(tmp_path / "raw.npz", FASHION_MNIST)
    assert torch.equal(data.images, expected) and data.labels.dtype == torch.int64
    assert data.labels.tolist() == labels.tolist()
    np.savez(tmp_path / "nchw.npz", x=raw[:, None])  # uint8 channels-first is transposed
    assert torch.equal(read_images(tmp_path / "nchw.npz", FASHION_MNIST).images, expected)
    pre = expected.numpy().astype(np.float64)
    np.savez(tmp_path / "pre.npz", pre)  # a single unnamed float array: already preprocessed, used as is
    assert torch.equal(read_images(tmp_path / "pre.npz", FASHION_MNIST).images, expected)


def test_array_errors(tmp_path):
    np.save(tmp_path / "nhwc.npy", np.zeros((4, 32, 32, 1), np.float32))
    with pytest.raises(InputError, match="channels-last"):
        read_images(tmp_path / "nhwc.npy", FASHION_MNIST)
    np.save(tmp_path / "int.npy", np.zeros((4, 28, 28), np.int64))
    with pytest.raises(InputError, match="uint8"):
        read_images(tmp_path / "int.npy", FASHION_MNIST)
    bad = np.zeros((2, 1, 32, 32), np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match=r"NaN or infinite values \(image 0; 1 of 2\)"):
        read_images(tmp_path / "nan.npy", FASHION_MNIST)
    np.savez(tmp_path / "labels.npz", images=np.zeros((3, 28, 28), np.uint8), labels=np.arange(2))
    with pytest.raises(InputError, match="labels"):
        read_images(tmp_path / "labels.npz", FASHION_MNIST)
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(InputError, match="'images'"):
        read_images(tmp_path / "two.npz", FASHION_MNIST)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read"):
        read_images(tmp_path / "junk.npz", FASHION_MNIST)
    (tmp_path / "junk.npy").write_bytes(b"junk" * 40)  # numpy's message would advise allow_pickle=True
    with pytest.raises(InputError, match="not a NumPy .npy file"):
        read_images(tmp_path / "junk.npy", FASHION_MNIST)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="Python objects, which are not loaded"):
        read_images(tmp_path / "objects.npy", FASHION_MNIST)
    # one H×W×3 photo saved as is would read as H grey images of W × 3 pixels
    np.save(tmp_path / "photo.npy", np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(InputError, match="1×H×W×C"):
        read_images(tmp_path / "photo.npy", FASHION_MNIST)


def test_float_arrays_that_look_like_raw_pixels_are_warned_about(tmp_path, test_split):
    raw = test_split[0][:8]
    normalised = preprocess_images(raw, FASHION_MNIST).numpy()
    np.save(tmp_path / "normalised.npy", normalised)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_images(tmp_path / "normalised.npy", FASHION_MNIST)
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2)))[:, None].astype(np.float32)
    for name, x, phrase in (("unit.npy", padded / 255, r"scaled to \[0, 1\]"), ("pixels.npy", padded, "0 … 255")):
        np.save(tmp_path / name, x)
        with pytest.warns(DataWarning, match=phrase):
            data = read_images(tmp_path / name, FASHION_MNIST)
        assert torch.equal(data.images, torch.from_numpy(x))  # used as given all the same


# --- built-in data and the shipped calibration set ------------------------------------------------------

def test_load_data_builtin():
    test = load_data("fashion-mnist", FASHION_MNIST, "test")
    assert len(test) == 10_000 and test.images.shape[1:] == (1, 32, 32) and test.source == "fashion-mnist:test"
    calib = load_data("builtin", FASHION_MNIST, "calibration")
    assert len(calib) == 512 and calib.classes[9] == "Ankle boot"
    with pytest.raises(UsageError, match="split"):
        load_data("builtin", FASHION_MNIST, "val")
    with pytest.raises(UsageError, match="needs a split: one of"):
        load_data("builtin", FASHION_MNIST)


def test_load_data_of_a_path_needs_no_split(tmp_path):
    """docs/data.md calls load_data(path, model.preprocess): the split, meaningless for a path, was a
    required argument (TypeError)."""
    np.save(tmp_path / "few.npy", np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    data = load_data(tmp_path / "few.npy", FASHION_MNIST)
    assert data.images.shape == (3, 1, 32, 32)
    with pytest.raises(InputError, match="did you mean"):
        load_data("fashion-mnst", FASHION_MNIST, "test")
    with pytest.raises(UsageError):
        builtin_dataset("cifar10")


def test_calibration_manifest_matches_shipped_file_and_debian_data(train_split):
    manifest = calibration_manifest()
    npz = builtin_mod.CALIBRATION_DIR / manifest["file"]
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == manifest["sha256"]
    assert 300_000 < npz.stat().st_size < 500_000
    assert manifest["licence"] == "MIT" and manifest["count"] == 512
    images, labels = train_split
    indices = np.array(manifest["indices"])
    # The selection is reproducible from the seed, and the shipped pixels are the Debian file's.
    np.testing.assert_array_equal(stratified_indices(labels, 512, manifest["selection"]["seed"]), indices)
    with np.load(npz) as shipped:
        np.testing.assert_array_equal(shipped["images"], images[indices])
        np.testing.assert_array_equal(shipped["labels"], labels[indices])
    counts = np.bincount(labels[indices], minlength=10)
    assert sorted(counts.tolist()) == [51] * 8 + [52] * 2
    calib = calibration_set()
    assert torch.equal(calib.images, preprocess_images(images[indices], FASHION_MNIST))


def test_stratified_indices_properties():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx = stratified_indices(labels, 10, seed=3)
    assert len(np.unique(idx)) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 2, 2]
    assert not np.array_equal(idx, stratified_indices(labels, 10, seed=4))


def test_tampered_calibration_file_is_refused(tmp_path, monkeypatch):
    manifest = calibration_manifest()
    blob = bytearray((builtin_mod.CALIBRATION_DIR / manifest["file"]).read_bytes())
    blob[-200] ^= 0xFF
    (tmp_path / manifest["file"]).write_bytes(bytes(blob))
    (tmp_path / "fashion-mnist-512.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(builtin_mod, "CALIBRATION_DIR", tmp_path)
    builtin_mod.calibration_manifest.cache_clear()
    try:
        with pytest.raises(InputError, match="sha256"):
            calibration_set()
    finally:
        builtin_mod.calibration_manifest.cache_clear()


def _npy_header(shape, dtype="<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_array_headers_are_checked_before_any_data_are_read(tmp_path, monkeypatch):
    """A header claiming 1e11 images was numpy's MemoryError traceback; a 3 MB compressed .npz was inflated
    to 3.4 GB before its shape was refused; arrays of Python objects in an .npz were "not a NumPy .npy file".
    Each is now one line from the headers alone: numpy's read_array is never reached."""
    import os
    import zipfile

    import mobilequant.data.readers as readers

    def no_data_read(*args, **kwargs):
        raise AssertionError("array data read before the header was checked")

    huge = tmp_path / "huge.npy"
    huge.write_bytes(_npy_header((10**11, 1, 32, 32)) + b"\0" * 1000)
    zipped = tmp_path / "huge.npz"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("images.npy", _npy_header((10**10, 1, 32, 32)) + b"\0" * 1000)
    wrong = tmp_path / "wrong.npz"  # compressed zeros of the wrong image size: refused by shape, not inflated
    with zipfile.ZipFile(wrong, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", _npy_header((1000, 1, 28, 28)) + bytes(1000 * 28 * 28 * 4))
    fits = tmp_path / "fits.npz"  # the model's size, more than the (lowered) memory limit
    with zipfile.ZipFile(fits, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", _npy_header((64, 1, 32, 32)) + bytes(64 * 32 * 32 * 4))
    raw = tmp_path / "raw.npy"  # uint8: small as stored, 4 bytes per model input value once preprocessed
    np.save(raw, np.zeros((64, 8, 8), np.uint8))
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.zeros((2, 1, 32, 32), np.float32), labels=np.array([1, 2], dtype=object))
    labels = tmp_path / "labels.npz"
    with zipfile.ZipFile(labels, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", _npy_header((2, 1, 32, 32)) + bytes(2 * 32 * 32 * 4))
        z.writestr("labels.npy", _npy_header((10**6,), "<i8") + bytes(8 * 10**6))
    device = tmp_path / "zero.npy"
    device.symlink_to("/dev/zero")

    monkeypatch.setattr(readers, "MAX_ARRAY_BYTES", 64 * 32 * 32 * 2)
    monkeypatch.setattr(np.lib.format, "read_array", no_data_read)
    cases = [
        (huge, rf"^cannot read {huge}: truncated \(its header declares float32 of shape \(100000000000, 1, 32, 32\)"),
        (zipped, rf"^cannot read {zipped}: truncated"),
        (wrong, rf"^{wrong}: float arrays are preprocessed model input and must be N×1×32×32, got shape "
                r"\(1000, 1, 28, 28\)"),
        (fits, rf"^{fits}: 64 images of float32 stored as \(64, 1, 32, 32\) would take 256\.0 KiB in memory, "
               r"more than the 128\.0 KiB read at once; pass fewer images$"),
        (raw, rf"^{raw}: 64 preprocessed images would take"),
        (objects, rf"^cannot read {objects}: it holds Python objects, which are not loaded"),
        (labels, rf"^{labels}: labels must be 2 integers, got int64 of shape \(1000000,\)$"),
    ]
    if os.path.exists("/dev/zero"):
        cases.append((device, rf"^cannot read {device}: not a regular file$"))
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            read_images(path, FASHION_MNIST)

    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np.lib.format, "read_array", out_of_memory)
    with pytest.raises(InputError, match=rf"^cannot read {fits}: not enough memory"):
        read_images(fits, FASHION_MNIST)
    monkeypatch.undo()
    with pytest.warns(DataWarning):  # zeros look like [0, 1] pixels
        assert read_images(fits, FASHION_MNIST).images.shape == (64, 1, 32, 32)  # within the limit: read
