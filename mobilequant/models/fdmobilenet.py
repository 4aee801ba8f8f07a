"""FD-MobileNet: MobileNet with fast downsampling (32× within the first 12 layers).

Paper: Qin et al., "FD-MobileNet: Improved MobileNet with a Fast Downsampling Strategy", ICIP 2018
(arXiv:1802.03750). Body as in the paper's Table 1: a 3×3/2 stem, then depthwise-separable layers that
reach 7×7 after five stride-2 steps, four extra 512-channel layers and a 1024-channel layer at 7×7.
ReLU as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model
from .mobilenetv1 import DepthwiseSeparable

__all__ = ["FDMobileNet"]

PAPER = "Qin et al. 2018, arXiv:1802.03750"

# (output channels, stride) of the depthwise-separable layers after the 32-channel stem.
_ARCH = [(64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 4 + [(1024, 1)]


class FDMobileNet(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, drop_rate: float = 0.0):
        super().__init__()
        in_chs = make_divisible(32 * width_mult)
        features: list[nn.Module] = [ConvNormAct(in_chans, in_chs, 3, stride=2)]
        for c, s in _ARCH:
            out_chs = make_divisible(c * width_mult)
            features.append(DepthwiseSeparable(in_chs, out_chs, s, act_layer=nn.ReLU))
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


def _gen_fdmobilenet(num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                     preprocess=None, **kwargs) -> FDMobileNet:
    model = FDMobileNet(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Figures: the paper's ImageNet comparison (MFLOPs, counted there as multiply-adds); it gives no parameter
# counts. The abstract confirms the 12 MFLOPs of 0.25×.
@register_model("fdmobilenet", PAPER, madds_m=144)
def fdmobilenet_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_fdmobilenet(num_classes, in_chans, width_mult, **kw)


@register_model("fdmobilenet", PAPER, madds_m=40)
def fdmobilenet_050(num_classes=1000, in_chans=3, width_mult=0.5, **kw):
    return _gen_fdmobilenet(num_classes, in_chans, width_mult, **kw)


@register_model("fdmobilenet", PAPER, madds_m=12)
def fdmobilenet_025(num_classes=1000, in_chans=3, width_mult=0.25, **kw):
    return _gen_fdmobilenet(num_classes, in_chans, width_mult, **kw)
