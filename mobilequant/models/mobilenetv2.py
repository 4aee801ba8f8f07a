"""MobileNetV2: inverted residuals with linear bottlenecks and ReLU6.

Paper: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
(arXiv:1801.04381). Figures other than 1.0 / 1.4 come from the authors' release table
(tensorflow/models, ``research/slim/nets/mobilenet``).

Parameter names and module structure are torchvision's (``features.N`` / ``.conv`` / ``classifier``),
so torchvision's ImageNet checkpoint ``mobilenet_v2-b0353104.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["MobileNetV2", "InvertedResidual"]

PAPER = "Sandler et al. 2018, arXiv:1801.04381"

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat) — the paper's Table 2.
_ARCH = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """``1×1 expand (ReLU6) → 3×3 depthwise (ReLU6) → 1×1 linear project`` (+ identity when shapes match).

    Children of ``conv``: ``[ConvNormAct expand]``, ``ConvNormAct depthwise``, ``Conv2d``, ``BatchNorm2d``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_chs, hidden, 1, act_layer=nn.ReLU6))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.ReLU6),
            nn.Conv2d(hidden, out_chs, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        drop_rate: float = 0.2,
        round_nearest: int = 8,
        arch: list[tuple[int, int, int, int]] | None = None,
        block: type[nn.Module] = InvertedResidual,
    ):
        super().__init__()
        arch = _ARCH if arch is None else arch
        in_chs = make_divisible(32 * width_mult, round_nearest)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvNormAct(in_chans, in_chs, 3, stride=2, act_layer=nn.ReLU6)]
        for t, c, n, s in arch:
            out_chs = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(in_chs, out_chs, s if i == 0 else 1, t))
                in_chs = out_chs
        features.append(ConvNormAct(in_chs, self.num_features, 1, act_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_mobilenetv2(num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                     preprocess=None, **kwargs) -> MobileNetV2:
    model = MobileNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


@register_model("mobilenetv2", PAPER, params_m=3.4, madds_m=300)
def mobilenetv2_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    """MobileNetV2 1.0 (torchvision-compatible parameter names)."""
    return _gen_mobilenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv2", PAPER, params_m=2.61, madds_m=209)
def mobilenetv2_075(num_classes=1000, in_chans=3, width_mult=0.75, **kw):
    return _gen_mobilenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv2", PAPER, params_m=1.95, madds_m=97)
def mobilenetv2_050(num_classes=1000, in_chans=3, width_mult=0.5, **kw):
    return _gen_mobilenetv2(num_classes, in_chans, width_mult, **kw)


@register_model("mobilenetv2", PAPER, params_m=1.66, madds_m=59)
def mobilenetv2_035(num_classes=1000, in_chans=3, width_mult=0.35, **kw):
    return _gen_mobilenetv2(num_classes, in_chans, width_mult, **kw)


# The paper's Table 4 says 6.9 M / 585 M for 1.4; the authors' release table (and this model) 6.06 M / 582 M.
@register_model("mobilenetv2", PAPER, params_m=6.06, madds_m=582)
def mobilenetv2_140(num_classes=1000, in_chans=3, width_mult=1.4, **kw):
    return _gen_mobilenetv2(num_classes, in_chans, width_mult, **kw)
