"""Xception: depthwise-separable convolutions with residual connections ("extreme Inception").

Paper: Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017
(arXiv:1610.02357), Figure 5: entry flow (two plain convs, three residual blocks with 1×1/2 projection
shortcuts), middle flow (8 residual blocks of three separable convs), exit flow. A separable conv is a
3×3 depthwise conv followed by a 1×1 pointwise conv with no non-linearity in between; every one is
followed by BN. ``xception_100`` is the paper's network (299×299); ``xception_sep_025`` is a mobile-sized
member of the family (a quarter of the width, 224×224).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["Xception", "SeparableConv", "XceptionBlock"]

PAPER = "Chollet 2017, arXiv:1610.02357"


class SeparableConv(nn.Module):
    """``[ReLU] → 3×3 depthwise → 1×1 pointwise → BN`` (pre-activation, as in the paper)."""

    def __init__(self, in_chs: int, out_chs: int, pre_act: bool = True):
        super().__init__()
        # Not in-place: the block's input is also its residual.
        self.act = nn.ReLU() if pre_act else nn.Identity()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, padding=1, groups=in_chs, bias=False)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_pw(self.conv_dw(self.act(x))))


class XceptionBlock(nn.Module):
    """Separable convs, optionally a 3×3/2 max-pool, plus a shortcut (identity or 1×1/2 conv + BN)."""

    def __init__(self, channels: list[int], in_chs: int, stride: int = 1, first_act: bool = True):
        super().__init__()
        convs = []
        c_in = in_chs
        for i, c in enumerate(channels):
            convs.append(SeparableConv(c_in, c, pre_act=first_act or i > 0))
            c_in = c
        self.convs = nn.Sequential(*convs)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        if stride == 1 and in_chs == c_in:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ConvNormAct(in_chs, c_in, 1, stride=stride, act_layer=None)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.convs(x)) + self.shortcut(x)


class Xception(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, middle_blocks: int = 8,
                 drop_rate: float = 0.0):
        super().__init__()

        def ch(c: int) -> int:
            return make_divisible(c * width_mult)

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, ch(32), 3, stride=2, padding=0),
            ConvNormAct(ch(32), ch(64), 3, padding=0),
        )
        entry = [
            XceptionBlock([ch(128)] * 2, ch(64), stride=2, first_act=False),
            XceptionBlock([ch(256)] * 2, ch(128), stride=2),
            XceptionBlock([ch(728)] * 2, ch(256), stride=2),
        ]
        middle = [XceptionBlock([ch(728)] * 3, ch(728)) for _ in range(middle_blocks)]
        exit_block = XceptionBlock([ch(728), ch(1024)], ch(728), stride=2)
        self.blocks = nn.Sequential(*entry, *middle, exit_block)
        self.num_features = ch(2048)
        self.conv_head = nn.Sequential(
            SeparableConv(ch(1024), ch(1536), pre_act=False),
            nn.ReLU(inplace=True),
            SeparableConv(ch(1536), self.num_features, pre_act=False),
            nn.ReLU(inplace=True),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_xception(num_classes: int, in_chans: int, width_mult: float, resolution: int | None, preprocess=None,
                  **kwargs) -> Xception:
    model = Xception(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# The paper's Table 3: 22,855,952 parameters (it reports no multiply-adds).
@register_model("xception", PAPER, params_m=22.855952, resolution=299)
def xception_100(num_classes=1000, in_chans=3, width_mult=1.0, resolution=None, preprocess=None, **kw):
    """The paper's Xception (299×299 unless ``resolution`` or ``preprocess`` says otherwise)."""
    if resolution is None and preprocess is None:
        resolution = 299
    return _gen_xception(num_classes, in_chans, width_mult, resolution, preprocess, **kw)


@register_model("xception", PAPER)
def xception_sep_025(num_classes=1000, in_chans=3, width_mult=0.25, resolution=None, **kw):
    """A mobile-sized Xception: a quarter of the width at 224×224 (no paper figures)."""
    return _gen_xception(num_classes, in_chans, width_mult, resolution, **kw)
