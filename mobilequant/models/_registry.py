"""Model registry: one decorator fills one dict (the timm pattern, without star-import side effects).

Each family module registers its variants with :func:`register_model`; ``mobilequant.models`` imports
the family modules explicitly, so the registry is complete as soon as the package is imported.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch.nn as nn

from ..errors import UsageError, did_you_mean


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw images become the model's input tensor (the single place preprocessing is defined).

    ``input_size`` is (channels, height, width); ``mean``/``std`` are per channel in [0, 1] pixel units.
    ``frame`` (with ``resize=None``): the (height, width) the training images had inside the input, e.g.
    Fashion-MNIST's 28×28 on a 32×32 zero canvas; images of another size are fitted into it first.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: int | None = 256  # shorter side before the centre crop; None = resize straight to input_size
    layout: str = "NCHW"
    frame: tuple[int, int] | None = None  # with resize=None: images are fitted into this box, then padded

    def with_channels(self, in_chans: int) -> PreprocessConfig:
        if in_chans == self.input_size[0]:
            return self
        mean = (sum(self.mean) / len(self.mean),) * in_chans
        std = (sum(self.std) / len(self.std),) * in_chans
        return replace(self, input_size=(in_chans, *self.input_size[1:]), mean=mean, std=std)

    def with_resolution(self, resolution: int) -> PreprocessConfig:
        resize = None if self.resize is None else round(resolution * self.resize / self.input_size[1])
        frame = None if self.frame is None else tuple(round(resolution * f / self.input_size[1]) for f in self.frame)
        return replace(self, input_size=(self.input_size[0], resolution, resolution), resize=resize, frame=frame)


IMAGENET = PreprocessConfig()
# Fashion-MNIST: 28x28 grey images padded to 32x32 (the documented choice for the shipped weights).
FASHION_MNIST = PreprocessConfig(input_size=(1, 32, 32), mean=(0.2860,), std=(0.3530,), resize=None, frame=(28, 28))


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a variant, without building it."""

    name: str
    family: str
    paper: str
    fn: Callable[..., nn.Module] = field(repr=False)
    paper_params_m: float | None = None  # paper's parameter count (millions) at the ImageNet config
    paper_madds_m: float | None = None  # paper's mult-adds (millions) at the ImageNet config
    paper_resolution: int = 224  # input size the paper's figures are for (299 for Xception, 32 for EffNet)
    paper_num_classes: int = 1000  # classifier size the paper's figures are for (10 for EffNet's CIFAR-10)

    @property
    def width_mult(self) -> float | None:
        """The variant's own width multiplier (the default of its ``width_mult``; ``None`` if it takes none).

        A variant is its family at one width: ``create_model(name, width_mult=w)`` builds the family at
        ``w`` in place of this, it does not scale the variant's width again."""
        import inspect

        param = inspect.signature(self.fn).parameters.get("width_mult")
        return None if param is None or param.default is inspect.Parameter.empty else float(param.default)


_model_entrypoints: dict[str, ModelInfo] = {}


def register_model(family: str, paper: str, params_m: float | None = None, madds_m: float | None = None,
                   resolution: int = 224, num_classes: int = 1000):
    """Register a variant function ``fn(num_classes=..., in_chans=..., width_mult=..., **kw) -> nn.Module``.

    ``params_m`` / ``madds_m`` are the paper's figures (millions) for ``resolution`` × ``resolution`` inputs and
    ``num_classes`` classes (ImageNet's 224 / 1000 unless the paper used another configuration).
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _model_entrypoints:
            raise RuntimeError(f"model {name!r} registered twice")
        _model_entrypoints[name] = ModelInfo(name, family, paper, fn, params_m, madds_m, resolution, num_classes)
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _model_entrypoints if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _model_entrypoints[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}{did_you_mean(name, _model_entrypoints)}; "
                         "see `mobilequant zoo list`") from None


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a zoo model by name. ``width_mult`` and family-specific options go in ``kwargs``.

    ``width_mult`` is the family's width multiplier and replaces the variant's own
    (:attr:`ModelInfo.width_mult`): ``create_model("mobilenetv2_050", width_mult=1.0)`` is MobileNetV2 1.0.

    The returned module has a ``pretrained_cfg``-like attribute ``preprocess`` (:class:`PreprocessConfig`)
    and ``model_name``.
    """
    info = model_info(name)
    if num_classes < 1 or in_chans < 1:
        raise UsageError(f"model {name!r}: num_classes and in_chans must be at least 1, got {num_classes} and {in_chans}")
    width = kwargs.get("width_mult")
    if width is not None and (isinstance(width, bool) or not (isinstance(width, (int, float))
                                                            and 0 < width < float("inf"))):
        raise UsageError(f"model {name!r}: width_mult must be a positive number, got {width!r}")
    try:
        model = info.fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        fixed = re.search(r"got multiple values for argument '(\w+)'", str(e))
        if fixed:  # the variant's own setting (shufflenetv1_g3: groups=3) passed again
            others = [n for n in list_models() if model_info(n).family == info.family and n != name]
            raise UsageError(f"model {name!r} sets {fixed.group(1)} itself; choose the variant that has the "
                             f"{fixed.group(1)} you want ({', '.join(others)})") from None
        raise UsageError(f"model {name!r}: {e}") from None
    model.model_name = name
    return model
