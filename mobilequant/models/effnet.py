"""EffNet: spatially separable depthwise convolutions with separable pooling, for small images.

Paper: Freeman et al., "EffNet: An Efficient Structure for Convolutional Neural Networks", ICIP 2018
(arXiv:1801.06434). Each block: ``1×1 conv (out/2) → 1×3 depthwise → 2×1 max-pool (halves H) →
3×1 depthwise → 1×2 conv with stride 2 along W (halves W, to out)``, each conv + BN + LeakyReLU. Three
blocks (64, 128, 256 channels), then flatten and one linear layer, as in the paper's CIFAR-10 model.

Because the classifier reads the flattened feature map, the network is built for one input resolution:
``resolution`` (default 32, the paper's) sets both the linear layer's size and ``preprocess``.
(The paper's activation-then-BN order is written here as BN-then-activation, so conv and BN fold.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError
from ._layers import ConvNormAct, init_weights, make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["EffNet", "EffNetBlock"]

PAPER = "Freeman et al. 2018, arXiv:1801.06434"

_CHANNELS = (64, 128, 256)


def _leaky_relu(inplace: bool = True) -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=inplace)


class EffNetBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid = out_chs // 2
        self.conv_pw = ConvNormAct(in_chs, mid, 1, act_layer=_leaky_relu)
        self.conv_dw_1x3 = ConvNormAct(mid, mid, (1, 3), groups=mid, act_layer=_leaky_relu)
        self.pool = nn.MaxPool2d(kernel_size=(2, 1), stride=(2, 1))
        self.conv_dw_3x1 = ConvNormAct(mid, mid, (3, 1), groups=mid, act_layer=_leaky_relu)
        self.conv_pwl = ConvNormAct(mid, out_chs, (1, 2), stride=(1, 2), padding=0, act_layer=_leaky_relu)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pwl(self.conv_dw_3x1(self.pool(self.conv_dw_1x3(self.conv_pw(x)))))


class EffNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, resolution: int = 32,
                 drop_rate: float = 0.0):
        super().__init__()
        if resolution < 8:
            raise UsageError(f"EffNet needs inputs of at least 8×8 (three 2× reductions), got {resolution}")
        in_chs = in_chans
        blocks = []
        for c in _CHANNELS:
            out_chs = make_divisible(c * width_mult)
            blocks.append(EffNetBlock(in_chs, out_chs))
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.feature_size = resolution // 8
        self.num_features = in_chs * self.feature_size * self.feature_size
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("effnet", PAPER, resolution=32, num_classes=10)
def effnet(num_classes=1000, in_chans=3, width_mult=1.0, resolution=None, preprocess=None, **kw):
    """EffNet for small images: 32×32 unless ``resolution`` or ``preprocess`` says otherwise (the classifier
    is sized for it)."""
    if resolution is None and preprocess is None:
        resolution = 32
    preprocess = make_preprocess(in_chans, resolution, preprocess)
    _, height, width = preprocess.input_size
    if height != width:
        raise UsageError(f"EffNet is built for square inputs, got {height}×{width}")
    model = EffNet(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, resolution=height, **kw)
    model.preprocess = preprocess
    return model
