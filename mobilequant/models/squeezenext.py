"""SqueezeNext: two-stage 1×1 squeeze, separable 1×3 / 3×1 convolutions, 1×1 expansion, residual add.

Paper: Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", CVPR-W 2018
(arXiv:1803.10615); block and stem as in the authors' Caffe definitions (github.com/amirgholami/SqueezeNext):
7×7/2 stem with 64 channels, 3×3/2 max-pool, four stages of 32/64/128/256 channels (× width), a 1×1 conv
to 128 (× width), global pooling and the classifier. Every conv is followed by BN and ReLU; the block's
output is ``ReLU(block(x) + shortcut(x))``. ``-23`` has (6, 6, 8, 1) blocks per stage, ``-23v5``
(2, 4, 14, 1). The authors trained at 227×227; here the stem is padded by 1 so that 224×224 inputs give
the same 55×55 grid after the max-pool.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["SqueezeNext", "SqnxtBlock"]

PAPER = "Gholami et al. 2018, arXiv:1803.10615"

_DEPTHS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}
_STAGE_CHANNELS = (32, 64, 128, 256)


class SqnxtBlock(nn.Module):
    """``1×1 (C/r) → 1×1 (C/2r) → 1×3 (C/r) → 3×1 (C/r) → 1×1 (out)``, each conv + BN + ReLU, where C is the
    input width and r = 1 for a stride-2 block, 4 for a block that narrows, 2 otherwise."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if stride == 2:
            reduction = 1
        elif in_chs > out_chs:
            reduction = 4
        else:
            reduction = 2
        mid = in_chs // reduction
        self.conv_reduce1 = ConvNormAct(in_chs, mid, 1, stride)
        self.conv_reduce2 = ConvNormAct(mid, mid // 2, 1)
        self.conv_1x3 = ConvNormAct(mid // 2, mid, (1, 3))
        self.conv_3x1 = ConvNormAct(mid, mid, (3, 1))
        self.conv_expand = ConvNormAct(mid, out_chs, 1)
        if stride == 1 and in_chs == out_chs:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride)
        self.act = nn.ReLU(inplace=True)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_reduce1(x)
        out = self.conv_expand(self.conv_3x1(self.conv_1x3(self.conv_reduce2(out))))
        return self.act(out + self.shortcut(x))


class SqueezeNext(nn.Module):
    def __init__(self, depth: str = "23", num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        stem_chs = make_divisible(64 * width_mult)
        self.stem = ConvNormAct(in_chans, stem_chs, 7, stride=2, padding=1)
        self.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        in_chs = stem_chs
        stages: list[nn.Module] = []
        for i, (n, c) in enumerate(zip(_DEPTHS[depth], _STAGE_CHANNELS)):
            out_chs = make_divisible(c * width_mult)
            blocks = [SqnxtBlock(in_chs if j == 0 else out_chs, out_chs, 2 if (j == 0 and i > 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = make_divisible(128 * width_mult)
        self.conv_head = ConvNormAct(in_chs, self.num_features, 1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.maxpool(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_squeezenext(depth: str, num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                     preprocess=None, **kwargs) -> SqueezeNext:
    model = SqueezeNext(depth, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Parameter counts: the paper's ImageNet tables (0.72 M for 1.0-SqNxt-23). The paper reports no
# multiply-adds for these variants.
@register_model("squeezenext", PAPER, params_m=0.72)
def squeezenext23_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_squeezenext("23", num_classes, in_chans, width_mult, **kw)


@register_model("squeezenext", PAPER)
def squeezenext23_150(num_classes=1000, in_chans=3, width_mult=1.5, **kw):
    return _gen_squeezenext("23", num_classes, in_chans, width_mult, **kw)


@register_model("squeezenext", PAPER)
def squeezenext23_200(num_classes=1000, in_chans=3, width_mult=2.0, **kw):
    return _gen_squeezenext("23", num_classes, in_chans, width_mult, **kw)


@register_model("squeezenext", PAPER)
def squeezenext23v5_100(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_squeezenext("23v5", num_classes, in_chans, width_mult, **kw)


@register_model("squeezenext", PAPER)
def squeezenext23v5_200(num_classes=1000, in_chans=3, width_mult=2.0, **kw):
    return _gen_squeezenext("23v5", num_classes, in_chans, width_mult, **kw)
