"""IGCV3: interleaved low-rank group convolutions (MobileNetV2's block with grouped 1×1 convs + permutations).

Paper: Sun et al., "IGCV3: Interleaved Low-Rank Group Convolutions for Efficient Deep Neural Networks",
BMVC 2018 (arXiv:1806.00178). IGCV3-D: MobileNetV2's widths with deeper stages (1, 4, 6, 8, 6, 6, 1
blocks). Each block, as in the authors' release: 1×1 group conv (G=2) expanding 6×, linear → permutation
→ 3×3 depthwise → ReLU6 → 1×1 group conv (G=2) projecting, linear → inverse permutation (+ identity).
Both permutations are channel shuffles (reshape → transpose → reshape).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ChannelShuffle, ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["IGCV3", "IGCV3Block"]

PAPER = "Sun et al. 2018, arXiv:1806.00178"

# t, c, n, s — MobileNetV2's table with IGCV3-D's deeper stages.
_ARCH = [(1, 16, 1, 1), (6, 24, 4, 2), (6, 32, 6, 2), (6, 64, 8, 2), (6, 96, 6, 1), (6, 160, 6, 2), (6, 320, 1, 1)]


class IGCV3Block(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, groups: int = 2):
        super().__init__()
        mid_chs = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv_pw = ConvNormAct(in_chs, mid_chs, 1, groups=groups, act_layer=None)
        self.shuffle = ChannelShuffle(groups)
        self.conv_dw = ConvNormAct(mid_chs, mid_chs, 3, stride, groups=mid_chs, act_layer=nn.ReLU6)
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, groups=groups, act_layer=None)
        self.unshuffle = ChannelShuffle(out_chs // groups)  # the inverse of shuffling with `groups` groups
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unshuffle(self.conv_pwl(self.conv_dw(self.shuffle(self.conv_pw(x)))))
        return x + out if self.use_res_connect else out


class IGCV3(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, drop_rate: float = 0.0):
        super().__init__()
        in_chs = make_divisible(32 * width_mult)
        features: list[nn.Module] = [ConvNormAct(in_chans, in_chs, 3, stride=2, act_layer=nn.ReLU6)]
        for t, c, n, s in _ARCH:
            out_chs = make_divisible(c * width_mult)
            for i in range(n):
                features.append(IGCV3Block(in_chs, out_chs, s if i == 0 else 1, t))
                in_chs = out_chs
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
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


def _gen_igcv3(num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
               preprocess=None, **kwargs) -> IGCV3:
    model = IGCV3(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


@register_model("igcv3", PAPER, params_m=3.5)
def igcv3_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    """IGCV3-D 1.0 (the authors' README: 3.5 M parameters on ImageNet)."""
    return _gen_igcv3(num_classes, in_chans, width_mult, **kw)


@register_model("igcv3", PAPER)
def igcv3_050(num_classes=1000, in_chans=3, width_mult=0.5, **kw):
    return _gen_igcv3(num_classes, in_chans, width_mult, **kw)
