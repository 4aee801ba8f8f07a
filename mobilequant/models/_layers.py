"""Building blocks shared by the zoo families.

Conv, BatchNorm and activation are always three separate modules (later stages fold BN into the conv
by matching patterns on the captured graph, so a BN that secretly owns an activation would be a trap).
:class:`ConvNormAct` is an ``nn.Sequential`` whose children are numbered ``0`` (conv), ``1`` (norm),
``2`` (activation) exactly like torchvision's ``Conv2dNormActivation``, so torchvision checkpoints load.

:func:`make_divisible` is the one place a width multiplier is turned into a channel count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import UsageError
from ._registry import IMAGENET, PreprocessConfig

__all__ = [
    "make_divisible",
    "ConvNormAct",
    "ChannelShuffle",
    "SqueezeExcitation",
    "init_weights",
    "make_preprocess",
]

LayerFn = Callable[..., nn.Module]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a (width-multiplied) channel count to a multiple of ``divisor``, never losing more than 10 %.

    Same rule as timm's ``make_divisible`` and torchvision's ``_make_divisible``, so channel counts
    (and therefore checkpoints) agree with both.
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Sequential):
    """``Conv2d → BatchNorm2d → activation`` as children ``0``, ``1``, ``2`` (torchvision's names).

    ``act_layer=None`` leaves the activation out (linear bottlenecks); ``norm_layer=None`` leaves the
    norm out and gives the conv a bias. ``kernel_size`` / ``stride`` may be tuples (1×3, 3×1 kernels).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        groups: int = 1,
        padding: int | tuple[int, int] | None = None,
        norm_layer: LayerFn | None = nn.BatchNorm2d,
        act_layer: LayerFn | None = nn.ReLU,
        bias: bool | None = None,
    ):
        if padding is None:
            padding = (kernel_size - 1) // 2 if isinstance(kernel_size, int) else tuple((k - 1) // 2 for k in kernel_size)
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_chs))
        if act_layer is not None:
            layers.append(act_layer(inplace=True) if _takes_inplace(act_layer) else act_layer())
        super().__init__(*layers)
        self.out_channels = out_chs


def _takes_inplace(act_layer: LayerFn) -> bool:
    return isinstance(act_layer, type) and issubclass(
        act_layer, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU)
    )


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle, written as ``reshape → transpose → reshape`` (export matches that)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, self.groups, c // self.groups, h, w)
        x = x.transpose(1, 2)
        return x.reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excite with torchvision's parameter names (``fc1``, ``fc2``).

    ``x * scale_activation(fc2(activation(fc1(avgpool(x)))))``; MobileNetV3 uses ``nn.Hardsigmoid`` as
    the scale activation.
    """

    def __init__(
        self,
        in_chs: int,
        squeeze_chs: int,
        act_layer: LayerFn = nn.ReLU,
        scale_layer: LayerFn = nn.Sigmoid,
    ):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(in_chs, squeeze_chs, 1)
        self.fc2 = nn.Conv2d(squeeze_chs, in_chs, 1)
        self.activation = act_layer()
        self.scale_activation = scale_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


def init_weights(model: nn.Module, linear_std: float = 0.01) -> None:
    """torchvision's initialisation: Kaiming (fan-out) convs, unit BN, small-normal classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def make_preprocess(
    in_chans: int = 3, resolution: int | None = None, preprocess: PreprocessConfig | None = None
) -> PreprocessConfig:
    """The preprocessing a variant is built for.

    ``preprocess`` (default: ImageNet's) adapted to ``in_chans`` channels, at ``resolution`` if given. A
    ``preprocess`` passed in with its own channel count must agree with ``in_chans``.
    """
    if preprocess is None:
        cfg = IMAGENET.with_channels(in_chans)
    elif isinstance(preprocess, PreprocessConfig):
        if preprocess.input_size[0] != in_chans:
            raise UsageError(f"preprocess has {preprocess.input_size[0]} channels but in_chans={in_chans}")
        cfg = preprocess
    else:
        raise UsageError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
    if resolution is not None:
        if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 1:
            raise UsageError(f"resolution must be a positive integer, got {resolution!r}")
        cfg = cfg.with_resolution(int(resolution))
    return cfg
