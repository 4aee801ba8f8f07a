"""ShuffleNetV1: 1×1 group convolutions with channel shuffle.

Paper: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018 (arXiv:1707.01083). Architecture and figures are the paper's Table 1 (its
"Complexity" row, in MFLOPs, which the paper defines as multiply-adds). The paper gives no parameter
counts, so none are registered.

As in the paper, the first 1×1 convolution of stage 2 is not grouped (its input has only 24 channels),
the bottleneck is a quarter of a unit's output channels, and stride-2 units concatenate a 3×3
average-pooled shortcut instead of adding it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UsageError
from ._layers import ChannelShuffle, ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["ShuffleNetV1", "ShuffleUnit"]

PAPER = "Zhang et al. 2018, arXiv:1707.01083"

_REPEATS = (4, 8, 4)
# Output channels of stages 2, 3, 4 at 1× for each group count (Table 1).
_STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}


class ShuffleUnit(nn.Module):
    """``1×1 GConv → BN → ReLU → shuffle → 3×3 DWConv → BN → 1×1 GConv → BN``, then add (stride 1) or
    concatenate with ``AvgPool 3×3/2`` of the input (stride 2), then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, group_first: bool = True):
        super().__init__()
        self.stride = stride
        mid_chs = out_chs // 4
        branch_out = out_chs - in_chs if stride == 2 else out_chs
        first_groups = groups if group_first else 1
        self.conv1 = ConvNormAct(in_chs, mid_chs, 1, groups=first_groups)
        self.shuffle = ChannelShuffle(groups) if first_groups > 1 else nn.Identity()
        self.conv_dw = ConvNormAct(mid_chs, mid_chs, 3, stride, groups=mid_chs, act_layer=None)
        self.conv2 = ConvNormAct(mid_chs, branch_out, 1, groups=groups, act_layer=None)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv_dw(self.shuffle(self.conv1(x))))
        if self.stride == 2:
            out = torch.cat((self.shortcut(x), out), dim=1)
        else:
            out = out + x
        return self.act(out)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, groups: int = 3):
        super().__init__()
        if groups not in _STAGE_CHANNELS:
            raise UsageError(f"ShuffleNetV1 groups must be one of {sorted(_STAGE_CHANNELS)}, got {groups!r}")
        self.groups = groups
        # Every unit's output is a multiple of 4·g, so the bottleneck (¼) splits into g groups; the stem
        # is a multiple of lcm(4, g) so that the first unit's concatenated branch does too.
        # The stem follows the reference implementation (megvii-model/ShuffleNet-Series), which keeps 24
        # channels at 1.5× (12 at 0.5×, 48 at 2×): with 36 the 1.5× g=3 net had 299.6 M mult-adds against
        # Table 5's 292 M; with 24, 292.4 M.
        stem_width = 24 if width_mult == 1.5 else 24 * width_mult
        stem_chs = make_divisible(stem_width, math.lcm(4, groups))
        self.conv1 = ConvNormAct(in_chans, stem_chs, 3, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = stem_chs
        for i, (repeats, c) in enumerate(zip(_REPEATS, _STAGE_CHANNELS[groups]), start=2):
            out_chs = make_divisible(c * width_mult, 4 * groups)
            units = [ShuffleUnit(in_chs, out_chs, 2, groups, group_first=i > 2)]
            units += [ShuffleUnit(out_chs, out_chs, 1, groups) for _ in range(repeats - 1)]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            in_chs = out_chs
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.stage4(self.stage3(self.stage2(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_shufflenetv1(groups: int, num_classes: int, in_chans: int, width_mult: float,
                      resolution: int | None = None, preprocess=None, **kwargs) -> ShuffleNetV1:
    model = ShuffleNetV1(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, groups=groups, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


@register_model("shufflenetv1", PAPER, madds_m=143)
def shufflenetv1_g1(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv1(1, num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv1", PAPER, madds_m=140)
def shufflenetv1_g2(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv1(2, num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv1", PAPER, madds_m=137)
def shufflenetv1_g3(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv1(3, num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv1", PAPER, madds_m=133)
def shufflenetv1_g4(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv1(4, num_classes, in_chans, width_mult, **kw)


@register_model("shufflenetv1", PAPER, madds_m=137)
def shufflenetv1_g8(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_shufflenetv1(8, num_classes, in_chans, width_mult, **kw)
