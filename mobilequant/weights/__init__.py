"""Shipped Fashion-MNIST checkpoints of the zoo's small models.

``manifest.json`` lists each checkpoint: the zoo model and its ``create_model`` kwargs, the
preprocessing it was trained with, test accuracy on the full 10k Fashion-MNIST test split, parameters,
the training recipe and the exact command (``scripts/train_defaults.py``) that produced it, and the
file's sha256. The product's default model is MobileNetV2 0.5 (``mobilenetv2_050``).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError, UsageError, did_you_mean
from ..data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from ..models import PreprocessConfig, create_model

__all__ = ["DEFAULT_WEIGHTS", "WEIGHTS_DIR", "default_model", "list_default_weights", "weights_info",
           "weights_table_markdown"]

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_WEIGHTS = "mobilenetv2_050"


@lru_cache(maxsize=None)
def _manifest() -> dict:
    path = WEIGHTS_DIR / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the weights manifest {path}: {e}; reinstall mobilequant") from None


def list_default_weights() -> list[str]:
    """Names of the shipped checkpoints (the zoo model names they were trained for), sorted."""
    return sorted(_manifest()["weights"])


def weights_info(name: str = DEFAULT_WEIGHTS) -> dict:
    """The manifest entry of one shipped checkpoint (a copy)."""
    weights = _manifest()["weights"]
    if name not in weights:
        raise UsageError(f"no shipped weights named {name!r}{did_you_mean(name, weights)}; "
                         f"shipped: {', '.join(sorted(weights))}")
    return json.loads(json.dumps(weights[name]))


def default_model(name: str = DEFAULT_WEIGHTS) -> nn.Module:
    """A zoo model with its shipped Fashion-MNIST weights, in eval mode.

    Built with the manifest's ``create_model`` kwargs and ``preprocess=`` the preprocessing it was
    trained with (28×28 grey zero-padded to 32×32, see :data:`mobilequant.models.FASHION_MNIST`), and
    ``class_names`` (Fashion-MNIST's, so image folders named by class are labelled by name).
    The checkpoint's sha256 is checked before it is loaded with ``torch.load(weights_only=True)``.
    """
    info = weights_info(name)
    path = WEIGHTS_DIR / info["file"]
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read shipped weights {path}: {e}; reinstall mobilequant") from None
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise InputError(f"{path} does not match the sha256 in the weights manifest; reinstall mobilequant")
    p = info["preprocess"]
    preprocess = PreprocessConfig(input_size=tuple(p["input_size"]), mean=tuple(p["mean"]), std=tuple(p["std"]),
                                  resize=p["resize"], layout=p["layout"],
                                  frame=None if p.get("frame") is None else tuple(p["frame"]))
    model = create_model(info["model"], **info["kwargs"], preprocess=preprocess)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.class_names = FASHION_MNIST_CLASSES  # every shipped checkpoint is a Fashion-MNIST classifier
    return model.eval()


def weights_table_markdown() -> str:
    """The Markdown table of the shipped weights (docs/zoo.md), generated from the manifest so they agree."""
    rows = ["| weights | `create_model` | top-1, 10k test | params | mult-adds at 1×32×32 | epochs | CPU time | command |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in list_default_weights():
        e = weights_info(name)
        kwargs = ", ".join(f"{k}={v}" for k, v in e["kwargs"].items())
        madds = "—" if e.get("madds_1x32x32") is None else f"{e['madds_1x32x32'] / 1e6:.2f} M"
        rows.append(f"| `{e['file']}` | `{e['model']}({kwargs})` | {e['test_top1']:.2f} % | {e['params']:,} "
                    f"| {madds} | {e['epochs']} | {e['train_cpu_seconds'] / 60:.1f} min | `{e['command']}` |")
    return "\n".join(rows)
