"""ShuffleNetV2: channel split, two branches, concatenation and channel shuffle.

Paper: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018
(arXiv:1807.11164); channel table is the paper's Table 5. Parameter names follow torchvision's
``shufflenet_v2_x*`` (``conv1``, ``stage2..4``, ``branch1`` / ``branch2``, ``conv5``, ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ChannelShuffle, ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["ShuffleNetV2", "InvertedResidual"]

PAPER = "Ma et al. 2018, arXiv:1807.11164"

_REPEATS = (4, 8, 4)
# Output channels of conv1, stage2, stage3, stage4, conv5 for the paper's four sizes (Table 5).
_CHANNELS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}


def _stage_channels(width_mult: float) -> tuple[int, ...]:
    """The paper's channels for its four sizes; other widths scale the 1.0× stages (multiples of 8)."""
    if width_mult in _CHANNELS:
        return _CHANNELS[width_mult]
    base = _CHANNELS[1.0]
    return (base[0], *(make_divisible(c * width_mult, 8) for c in base[1:4]), 2048 if width_mult > 1.5 else 1024)


def _branch_stride2(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, in_chs, 3, 2, 1, groups=in_chs, bias=False),
        nn.BatchNorm2d(in_chs),
        nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def _branch_main(in_chs: int, out_chs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_chs, out_chs, 3, stride, 1, groups=out_chs, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.Conv2d(out_chs, out_chs, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit. Stride 1: split channels in half, transform one half. Stride 2: both branches
    see the whole input and halve the resolution. Then concatenate and shuffle with 2 groups."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if out_chs % 2:
            raise ValueError(f"output channels must be even, got {out_chs}")
        self.stride = stride
        branch_chs = out_chs // 2
        if stride == 1 and in_chs != out_chs:
            raise ValueError("a stride-1 ShuffleNetV2 unit keeps its channel count")
        self.branch1 = _branch_stride2(in_chs, branch_chs) if stride > 1 else nn.Sequential()
        self.branch2 = _branch_main(in_chs if stride > 1 else branch_chs, branch_chs, stride)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        chs = _stage_channels(width_mult)
        self.conv1 = ConvNormAct(in_chans, chs[0], 3, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = chs[0]
        for i, (repeats, out_chs) in enumerate(zip(_REPEATS, chs[1:4]), start=2):
            units = [InvertedResidual(in_chs, out_chs, 2)]
            units += [InvertedResidual(out_chs, out_chs, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            in_chs = out_chs
        self.num_features = chs[4]
        self.conv5 = ConvNormAct(in_chs, self.num_features, 1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.conv5(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_shufflenetv2(num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                      preprocess=None, **kwargs) -> ShuffleNetV2:
    model = ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Figures: the paper's Table 5 ("FLOPs" there are multiply-adds; "# of weights").
@register_model("shufflenetv2", PAPER, params_m=1.4, madds_m=41)
def shufflenetv2_x0_5(num_classes=1000, in_chans=3, width_mult=0.5, **kw):
    return _gen_shufflenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv2", PAPER, params_m=2.3, madds_m=146)
def shufflenetv2_x1_0(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv2", PAPER, params_m=3.5, madds_m=299)
def shufflenetv2_x1_5(num_classes=1000, in_chans=3, width_mult=1.5, **kw):
    return _gen_shufflenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv2", PAPER, params_m=7.4, madds_m=591)
def shufflenetv2_x2_0(num_classes=1000, in_chans=3, width_mult=2.0, **kw):
    return _gen_shufflenetv2(num_classes, in_chans, width_mult, **kw)
