"""MobileNetV1: depthwise-separable convolutions with a width multiplier α and resolution ρ.

Paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017 (arXiv:1704.04861). Body as in the paper's Table 1; activations are ReLU6 as in the
authors' released TensorFlow models (the paper's figures say ReLU; the counts are the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["MobileNetV1", "DepthwiseSeparable"]

PAPER = "Howard et al. 2017, arXiv:1704.04861"

# (output channels, stride) of the 13 depthwise-separable layers — the paper's Table 1.
_ARCH = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Module):
    """``3×3 depthwise → BN → ReLU6 → 1×1 pointwise → BN → ReLU6``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act_layer=nn.ReLU6):
        super().__init__()
        self.conv_dw = ConvNormAct(in_chs, in_chs, 3, stride, groups=in_chs, act_layer=act_layer)
        self.conv_pw = ConvNormAct(in_chs, out_chs, 1, act_layer=act_layer)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.0, act_layer=nn.ReLU6):
        super().__init__()
        in_chs = make_divisible(32 * width_mult)
        features: list[nn.Module] = [ConvNormAct(in_chans, in_chs, 3, stride=2, act_layer=act_layer)]
        for c, s in _ARCH:
            out_chs = make_divisible(c * width_mult)
            features.append(DepthwiseSeparable(in_chs, out_chs, s, act_layer))
            in_chs = out_chs
        self.features = nn.Sequential(*features)
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(in_chs, num_classes))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_mobilenetv1(num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                     preprocess=None, **kwargs) -> MobileNetV1:
    model = MobileNetV1(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Figures: the paper's Table 6 (width multiplier at 224×224).
@register_model("mobilenetv1", PAPER, params_m=4.2, madds_m=569)
def mobilenetv1_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_mobilenetv1(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv1", PAPER, params_m=2.6, madds_m=325)
def mobilenetv1_075(num_classes=1000, in_chans=3, width_mult=0.75, **kw):
    return _gen_mobilenetv1(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv1", PAPER, params_m=1.3, madds_m=149)
def mobilenetv1_050(num_classes=1000, in_chans=3, width_mult=0.5, **kw):
    return _gen_mobilenetv1(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv1", PAPER, params_m=0.5, madds_m=41)
def mobilenetv1_025(num_classes=1000, in_chans=3, width_mult=0.25, **kw):
    return _gen_mobilenetv1(num_classes, in_chans, width_mult, **kw)
