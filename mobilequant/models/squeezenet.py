"""SqueezeNet 1.0 and 1.1: fire modules (1×1 squeeze, then parallel 1×1 / 3×3 expand).

Paper: Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model
size", 2016 (arXiv:1602.07360); 1.1 is the authors' revision (github.com/forresti/SqueezeNet, "2.4x
less computation than 1.0, without sacrificing accuracy"). No BatchNorm, as in the paper. Parameter
names follow torchvision's ``squeezenet1_0`` / ``squeezenet1_1``. ``width_mult`` scales every fire module.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import make_divisible, make_preprocess
from ._registry import register_model

__all__ = ["SqueezeNet", "Fire"]

PAPER = "Iandola et al. 2016, arXiv:1602.07360"

# Fire modules as (squeeze, expand 1×1, expand 3×3); "M" is a 3×3/2 max-pool.
_ARCHS = {
    "1_0": dict(stem=(96, 7), body=[(16, 64, 64), (16, 64, 64), (32, 128, 128), "M", (32, 128, 128),
                                    (48, 192, 192), (48, 192, 192), (64, 256, 256), "M", (64, 256, 256)]),
    "1_1": dict(stem=(64, 3), body=[(16, 64, 64), (16, 64, 64), "M", (32, 128, 128), (32, 128, 128), "M",
                                    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]),
}


class Fire(nn.Module):
    def __init__(self, in_chs: int, squeeze_chs: int, expand1x1_chs: int, expand3x3_chs: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_chs, squeeze_chs, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_chs, expand1x1_chs, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_chs, expand3x3_chs, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.out_channels = expand1x1_chs + expand3x3_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            (self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))), 1
        )


class SqueezeNet(nn.Module):
    def __init__(self, version: str = "1_0", num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.5):
        super().__init__()
        arch = _ARCHS[version]
        stem_chs, stem_k = arch["stem"]
        in_chs = make_divisible(stem_chs * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(in_chans, in_chs, kernel_size=stem_k, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        ]
        for item in arch["body"]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
                continue
            fire = Fire(in_chs, *(make_divisible(c * width_mult) for c in item))
            layers.append(fire)
            in_chs = fire.out_channels
        self.features = nn.Sequential(*layers)
        self.num_features = in_chs
        # The classifier is a 1×1 conv per class, then ReLU and global average pooling (the paper's conv10).
        final_conv = nn.Conv2d(in_chs, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=drop_rate), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return torch.flatten(self.classifier(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _gen_squeezenet(version: str, num_classes: int, in_chans: int, width_mult: float, resolution: int | None = None,
                    preprocess=None, **kwargs) -> SqueezeNet:
    model = SqueezeNet(version, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    model.preprocess = make_preprocess(in_chans, resolution, preprocess)
    return model


# Parameter counts: the paper's Table 2 (1,248,424) and the 1.1 release notes (≈1.24 M). Neither states
# multiply-adds; the test checks the "2.4× less computation" ratio between the two.
@register_model("squeezenet", PAPER, params_m=1.248424)
def squeezenet1_0(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_squeezenet("1_0", num_classes, in_chans, width_mult, **kw)


@register_model("squeezenet", PAPER, params_m=1.24)
def squeezenet1_1(num_classes=1000, in_chans=3, width_mult=1.0, **kw):
    return _gen_squeezenet("1_1", num_classes, in_chans, width_mult, **kw)
