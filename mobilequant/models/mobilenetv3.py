"""MobileNetV3-Large and -Small: inverted residuals with h-swish and squeeze-excite (h-sigmoid gate).

Paper: Howard et al., "Searching for MobileNetV3", ICCV 2019 (arXiv:1905.02244); block tables are the
paper's Tables 1 and 2. Parameter names follow torchvision's ``mobilenet_v3_large`` / ``_small``
(``features.N.block.M``, SE ``fc1``/``fc2``, ``classifier.0``/``.3``), BN eps 1e-3, momentum 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from ._layers import ConvNormAct, SqueezeExcitation, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["MobileNetV3", "InvertedResidual"]

PAPER = "Howard et al. 2019, arXiv:1905.02244"

_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


@dataclass(frozen=True)
class BlockCfg:
    """One bneck row of the paper's table, channels before the width multiplier."""

    in_chs: int
    kernel: int
    exp_chs: int
    out_chs: int
    use_se: bool
    use_hs: bool
    stride: int


# in, kernel, exp, out, SE, h-swish, stride
_LARGE = [
    BlockCfg(16, 3, 16, 16, False, False, 1),
    BlockCfg(16, 3, 64, 24, False, False, 2),
    BlockCfg(24, 3, 72, 24, False, False, 1),
    BlockCfg(24, 5, 72, 40, True, False, 2),
    BlockCfg(40, 5, 120, 40, True, False, 1),
    BlockCfg(40, 5, 120, 40, True, False, 1),
    BlockCfg(40, 3, 240, 80, False, True, 2),
    BlockCfg(80, 3, 200, 80, False, True, 1),
    BlockCfg(80, 3, 184, 80, False, True, 1),
    BlockCfg(80, 3, 184, 80, False, True, 1),
    BlockCfg(80, 3, 480, 112, True, True, 1),
    BlockCfg(112, 3, 672, 112, True, True, 1),
    BlockCfg(112, 5, 672, 160, True, True, 2),
    BlockCfg(160, 5, 960, 160, True, True, 1),
    BlockCfg(160, 5, 960, 160, True, True, 1),
]
_SMALL = [
    BlockCfg(16, 3, 16, 16, True, False, 2),
    BlockCfg(16, 3, 72, 24, False, False, 2),
    BlockCfg(24, 3, 88, 24, False, False, 1),
    BlockCfg(24, 5, 96, 40, True, True, 2),
    BlockCfg(40, 5, 240, 40, True, True, 1),
    BlockCfg(40, 5, 240, 40, True, True, 1),
    BlockCfg(40, 5, 120, 48, True, True, 1),
    BlockCfg(48, 5, 144, 48, True, True, 1),
    BlockCfg(48, 5, 288, 96, True, True, 2),
    BlockCfg(96, 5, 576, 96, True, True, 1),
    BlockCfg(96, 5, 576, 96, True, True, 1),
]
_ARCHS = {"large": (_LARGE, 1280), "small": (_SMALL, 1024)}


class InvertedResidual(nn.Module):
    """``[1×1 expand] → k×k depthwise → [SE] → 1×1 linear project`` (+ identity when shapes match)."""

    def __init__(self, in_chs: int, kernel: int, exp_chs: int, out_chs: int, use_se: bool, use_hs: bool,
                 stride: int):
        super().__init__()
        act = nn.Hardswish if use_hs else nn.ReLU
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if exp_chs != in_chs:
            layers.append(ConvNormAct(in_chs, exp_chs, 1, norm_layer=_norm, act_layer=act))
        layers.append(ConvNormAct(exp_chs, exp_chs, kernel, stride, groups=exp_chs, norm_layer=_norm, act_layer=act))
        if use_se:
            layers.append(SqueezeExcitation(exp_chs, make_divisible(exp_chs // 4, 8), scale_layer=nn.Hardsigmoid))
        layers.append(ConvNormAct(exp_chs, out_chs, 1, norm_layer=_norm, act_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, arch: str = "large", num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.2):
        super().__init__()
        blocks, head_chs = _ARCHS[arch]

        def ch(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        features: list[nn.Module] = [
            ConvNormAct(in_chans, ch(blocks[0].in_chs), 3, stride=2, norm_layer=_norm, act_layer=nn.Hardswish)
        ]
        for b in blocks:
            # Expansion is a ratio of the (already narrowed) input, as in the authors' TF implementation;
            # at width 1.0 this is exactly the table's expansion size.
            in_chs = ch(b.in_chs)
            exp_chs = make_divisible(in_chs * b.exp_chs / b.in_chs, 8)
            features.append(InvertedResidual(in_chs, b.kernel, exp_chs, ch(b.out_chs), b.use_se, b.use_hs, b.stride))
        last_in = ch(blocks[-1].out_chs)
        last_out = 6 * last_in
        features.append(ConvNormAct(last_in, last_out, 1, norm_layer=_norm, act_layer=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The head is not narrowed below 1.0 (the paper's 0.75 figures keep 1280 / 1024, as timm does).
        self.num_features = make_divisible(head_chs * max(1.0, width_mult), 8)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, self.num_features),
            nn.Hardswish(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(self.num_features, num_classes),
        )
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return x
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_mobilenetv3(arch: str, num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                     preprocess=None, **kwargs) -> MobileNetV3:
    model = MobileNetV3(arch, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Figures: the paper's Table 3 (224×224).
@register_model("mobilenetv3", PAPER, params_m=5.4, madds_m=219)
def mobilenetv3_large_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_mobilenetv3("large", num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv3", PAPER, params_m=4.0, madds_m=155)
def mobilenetv3_large_075(num_classes=1000, in_chans=3, width_mult=0.75, **kw):
    return _gen_mobilenetv3("large", num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv3", PAPER, params_m=2.5, madds_m=56)
def mobilenetv3_small_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_mobilenetv3("small", num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv3", PAPER, params_m=2.0, madds_m=44)
def mobilenetv3_small_075(num_classes=1000, in_chans=3, width_mult=0.75, **kw):
    return _gen_mobilenetv3("small", num_classes, in_chans, width_mult, **kw)
