"""Quantization options: one frozen dataclass, validated on construction.

Every default on one line with its type and meaning; a wrong value raises :class:`UsageError` with one
line naming the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ..errors import UsageError, did_you_mean

__all__ = ["QuantConfig", "CALIBRATION_METHODS", "RELU6_MODES"]

CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
RELU6_MODES = ("clamped", "fixed")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized to the TFLite int8 scheme (int8 weights and activations, int32 bias).

    Measured on the shipped MobileNetV2 0.5 (Fashion-MNIST, float 91.11 % on the 10k test split, 512
    calibration images), top-1 of the simulated int8 model: per channel with minmax 90.96 %, mse 91.13 %,
    percentile 91.06 %, entropy 90.08 %, minmax + bias correction 91.02 %; per tensor 63.40 %, per tensor
    with CLE 91.02 %. Activation ranges cost more than weights there (top-1 agreement with float on 4k
    images: weights only 99.70 %, activations only 99.15 %).

    ``mse`` is the default calibration: in real runtimes (per-channel tflite-int8 files, full 10k test
    split, ``benchmarks/compare.py``) its top-1 agreement with the float model was higher than minmax's
    on five of the six shipped Fashion-MNIST models and one image lower on the sixth (minmax → mse: MobileNetV2
    99.00 → 99.22 %, ShuffleNetV2 99.08 → 99.32 %, ShuffleNetV1 96.14 → 96.49 %, MobileNetV3-Small 98.52 →
    98.67 %, SqueezeNet 99.53 → 99.62 %, MobileNetV1 99.61 → 99.60 %), at the same calibration cost.

    ``bias_correction`` is on by default: after calibration, each conv / linear layer's mean output error
    on the calibration images (weights *and* input activations quantized, layers above already corrected;
    :func:`mobilequant.quant.bias_correction.correct`) is subtracted from its bias. Simulated, per channel,
    mse: ImageNet MobileNetV2 on the held-out photo crops, top-1 agreement with float 79.2 → 91.7 % and
    float top-1 in the top 5 91.7 → 100 % (the tflite file: 79.2 % either way — near-tie crops — and top 5
    91.7 → 100 %); tflite files on the 10k Fashion-MNIST test split: agreement up on four of the six
    shipped models, 2–3 images down on two (``docs/quantization.md``). It costs one pass over the
    calibration images holding every live activation of both paths (capped at 2 GiB: ~50 images of a
    224-px MobileNetV2). QAT jobs turn it off (they train the biases); the data-free ReLU6 recipe too.

    ``adaround`` (off by default: it costs minutes, not seconds) learns per weight whether it is rounded
    up or down, layer by layer, to minimise the layer's output error against the float model
    (:mod:`mobilequant.quant.adaround`; the scales stay the calibrated ones), then corrects the biases
    when ``bias_correction`` is on. Shipped MobileNetV2 0.5, tflite-int8 on the 10k test split: agreement
    with float 99.20 → 99.32 %, drop +0.10 → +0.07 pp; per tensor + CLE + BC: drop +0.22 → −0.01 pp
    (``docs/quantization.md``). ~5 min instead of ~30 s on one core for a 32-px Fashion-MNIST model.

    ``range_search`` (off by default: minutes) runs last, on the model with its final weights and biases:
    each activation range is narrowed by the factor (0.2 … 0.9, or kept) that most lowers the KL
    divergence of the simulated int8 model's output from the float model's on the calibration images,
    range by range in graph order, two passes, cut back to the point of the walk where the output error
    of every eighth calibration image (held out of the choices) was lowest
    (:mod:`mobilequant.quant.range_search`). Simulated, 10k test split, agreement with float:
    ShuffleNetV1 97.66 → 98.15 %, MobileNetV2 0.5 99.18 → 99.32 % (before the early stop).
    """

    per_channel: bool = True  # weights: one scale per output channel (False: one per tensor)
    calibration: str = "mse"  # activation range method: mse | minmax | moving_average | percentile | entropy
    relu6: str = "clamped"  # ReLU6 outputs: "clamped" = [0, min(6, calibrated max)], "fixed" = exactly [0, 6]
    cle: bool = False  # cross-layer equalization before calibration (mobilequant.quant.cle)
    bias_correction: bool = True  # move each conv / linear output's mean quantization error into its bias
    range_search: bool = False  # narrow activation ranges where the model's output error drops (loss-aware)
    adaround: bool = False  # learn each weight's rounding (up / down) from calibration data (AdaRound)
    adaround_iterations: int = 1000  # AdaRound optimisation steps per layer
    weight_bits: int = 8  # symmetric weight range ±(2**(bits-1) - 1), stored as int8 (2..8)
    float_fallback: bool = False  # leave ops the int8 scheme cannot express in float instead of failing
    percentile: float = 99.99  # for calibration="percentile": percentile of |activation| kept, in (50, 100]
    num_calibration: int = 512  # calibration samples used at most (images, not batches)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise UsageError(f"QuantConfig.{f.name} must be true or false, got {value!r}")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"QuantConfig.{f.name} must be an integer, got {value!r}")
        if self.calibration not in CALIBRATION_METHODS:
            raise UsageError(
                f"QuantConfig.calibration: unknown method {self.calibration!r}"
                f"{did_you_mean(str(self.calibration), CALIBRATION_METHODS)}; "
                f"choose from {', '.join(CALIBRATION_METHODS)}"
            )
        if self.relu6 not in RELU6_MODES:
            raise UsageError(
                f"QuantConfig.relu6: unknown mode {self.relu6!r}{did_you_mean(str(self.relu6), RELU6_MODES)}; "
                f"choose from {', '.join(RELU6_MODES)}"
            )
        if not 2 <= self.weight_bits <= 8:
            raise UsageError(f"QuantConfig.weight_bits must be between 2 and 8, got {self.weight_bits}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not (
            50.0 < float(self.percentile) <= 100.0
        ):
            raise UsageError(f"QuantConfig.percentile must be a number in (50, 100], got {self.percentile!r}")
        if self.adaround_iterations < 1:
            raise UsageError(f"QuantConfig.adaround_iterations must be at least 1, got {self.adaround_iterations}")
        if self.num_calibration < 1:
            raise UsageError(f"QuantConfig.num_calibration must be at least 1, got {self.num_calibration}")

    @property
    def weight_qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise UsageError(f"unknown quantization option {key!r}{did_you_mean(key, names)}")
        return cls(**d)

    def replace(self, **changes) -> QuantConfig:
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise UsageError(f"unknown quantization option {key!r}{did_you_mean(key, names)}")
        return dataclasses.replace(self, **changes)
