"""``MobileQuantizer``: torchao PT2E annotations for the TFLite int8 quantization specification.

The annotations map one to one onto TFLite's int8 rules
(https://ai.google.dev/edge/litert/models/quantization_spec), so a converter can lower the
quantize/dequantize graph without changing any parameter:

==================  ===============================================================================
weights             int8 symmetric, zero point 0, range −127..127, per output channel (axis 0) or
                    per tensor (``QuantConfig.per_channel``)
activations         int8 asymmetric per tensor, −128..127
bias                int32, zero point 0, scale = input scale × weight scale (``DerivedQuantizationSpec``)
conv / linear       input, weight and bias annotated; the output is quantized after the fused
                    ReLU / ReLU6 / clamp when one follows (one fused int8 op), else on the conv output itself
                    (linear bottleneck: calibrated asymmetric range); before a per-channel
                    ``clamp.Tensor`` (CLE's exact ReLU6) the conv output and the clamp share one range,
                    observed after the clamp (MINIMUM/MAXIMUM keep their input's parameters)
ReLU6 outputs       zero point exactly −128 (0.0 exact); max = min(6, calibrated) or exactly 6
add / mul / sub     both inputs and the output quantized; ADD + ReLU/ReLU6/clamp fused like conv
clamps              ReLU, ReLU6, ``hardtanh`` / ``clamp`` with number bounds: after a conv / linear / add /
                    mul / sub, fused into it (the converter makes the clamp the op's fused activation, or
                    MINIMUM / MAXIMUM on its output, which keep the parameters); alone, ReLU and ReLU6
                    take their own range, other bounds their input's (MINIMUM / MAXIMUM: in = out)
shared parameters   concat, max/avg pool, reshape/view/transpose/permute (channel shuffle), pad,
                    flatten, dropout/clone, slice/chunk/split, squeeze/unsqueeze: output = input
fixed parameters    sigmoid / hardsigmoid / softmax: scale 1/256, zero point −128; tanh: 1/128, 0
own parameters      hardswish, mean, global adaptive_avg_pool2d (MEAN; capture spells the other
                    adaptive pools it can as avg_pool2d); a hardswish's output scale is then moved (≤ 0.2 %)
                    to one at which TFLite's fixed-point HARD_SWISH is exact (:func:`snap_hardswish_scales`)
leaky_relu          the input's range through the op, scale snapped so that 256·s_in/s_out is an odd
                    integer, and the negative slope made the one the kernel computes (XNNPACK's
                    LEAKY_RELU keeps 8 fractional bits of its multipliers; :func:`snap_to_kernels`)
==================  ===============================================================================

Each rule is one annotator parameterised by the op (:data:`OP_RULES` is the dispatch table); ops not in
the table are reported by :meth:`MobileQuantizer.validate` (or left in float with
``QuantConfig(float_fallback=True)``: a recipe's ``quantization.float_fallback``).

Observers come from :mod:`mobilequant.quant.observers` (``make_activation_observer`` /
``make_weight_observer``): the calibration method is ``QuantConfig.calibration``.

PTQ and QAT differ only by the constructor in each spec (``is_qat=True``): activations get a
``FakeQuantize`` over a moving-average observer (EMA 0.01, same ReLU6 mode), weights a ``FakeQuantize``
over a moving-average min/max observer with averaging constant 1 (the range of the current weights),
``learn_scales=True`` uses ``LearnableFakeQuantize`` (LSQ) instead; fixed parameters stay fixed. In QAT
the BN is still in the graph (torchao folds it while training): the conv annotator looks through a BN that
is the conv's only user and puts the output spec after it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import FakeQuantize, LearnableFakeQuantize
from torchao.quantization.pt2e.observer import (
    FixedQParamsObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
)
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    QuantizationSpecBase,
    Quantizer,
    SharedQuantizationSpec,
)

from ..capture import find_unsupported_ops, is_structural, layer_name
from ..errors import InputError, UsageError
from ..fusion import BN_OPS, CONV_OPS, activation_kind, clamp_bounds
from . import observers
from .config import QuantConfig

__all__ = [
    "MobileQuantizer",
    "ClampedRangeObserver",
    "Rule",
    "OP_RULES",
    "FIXED_QPARAMS",
    "activation_observer",
    "weight_observer",
    "is_bn_bookkeeping",
    "RELU6_SCALE",
    "hardswish_kernel_table",
    "hardswish_exact_table",
    "snap_hardswish_scales",
    "snap_to_kernels",
]

aten = torch.ops.aten
Q_KEY = "quantization_annotation"
FUSED_INTO = "mq_fused_into"  # node.meta key: the layer a fused activation belongs to (its conv / add)

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
RELU6_SCALE = 6.0 / 255.0


class Rule(enum.Enum):
    """How an op is annotated; one annotator per rule."""

    WEIGHTED = "weighted"  # conv / linear: input + weight + int32 bias, output (or fused activation)
    BINARY = "binary"  # add / mul / sub: every tensor input + output (or fused activation)
    SHARED = "shared"  # output shares the input's parameters (data movement, max/avg pooling, concat)
    SPLIT = "split"  # multi-output data movement: each getitem output shares the input's parameters
    FIXED = "fixed"  # output has fixed parameters (FIXED_QPARAMS)
    OWN = "own"  # input + own calibrated output
    CLAMP = "clamp"  # relu / relu6 / hardtanh / clamp: fused into its producer, else own (relu, relu6) or shared
    LEAKY = "leaky"  # leaky_relu: output range from the input's, scale snapped to XNNPACK's 8-bit multiplier


OP_RULES: dict[torch._ops.OpOverload, Rule] = {
    **{op: Rule.WEIGHTED for op in (*CONV_OPS, aten.linear.default)},
    **{
        op: Rule.BINARY
        for op in (aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor, aten.sub.Tensor)
    },
    **{
        op: Rule.SHARED
        for op in (
            aten.cat.default,
            aten.max_pool2d.default,
            aten.avg_pool2d.default,
            aten.reshape.default,
            aten.view.default,
            aten._unsafe_view.default,
            aten.transpose.int,
            aten.permute.default,
            aten.flatten.using_ints,
            aten.pad.default,
            aten.constant_pad_nd.default,
            aten.dropout.default,
            aten.clone.default,
            aten.contiguous.default,
            aten.alias.default,
            aten.slice.Tensor,
            aten.narrow.default,
            aten.select.int,
            aten.squeeze.dim,
            aten.squeeze.dims,
            aten.unsqueeze.default,
            aten.pixel_shuffle.default,
            aten.upsample_nearest2d.vec,  # TFLite RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR: int8 in = out
            aten.upsample_bilinear2d.vec,
            aten.clamp.Tensor,  # per-channel clamp (CLE's exact ReLU6): TFLite MINIMUM/MAXIMUM share
        )
    },
    **{
        op: Rule.SPLIT
        for op in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
    },
    **{
        op: Rule.FIXED
        for op in (
            aten.hardsigmoid.default,
            aten.hardsigmoid_.default,
            aten.sigmoid.default,
            aten.sigmoid_.default,
            aten.softmax.int,
            aten._softmax.default,
            aten.tanh.default,
            aten.log_softmax.int,
            aten._log_softmax.default,
        )
    },
    **{
        op: Rule.OWN
        for op in (
            aten.hardswish.default,
            aten.hardswish_.default,
            aten.mean.dim,
            aten.adaptive_avg_pool2d.default,
        )
    },
    aten.leaky_relu.default: Rule.LEAKY,
    aten.leaky_relu_.default: Rule.LEAKY,
    **{
        op: Rule.CLAMP
        for op in (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                   aten.clamp.default, aten.clamp_.default)
    },
}

# TFLite's fixed output parameters (scale, zero point) for int8.
FIXED_QPARAMS: dict[str, tuple[float, int]] = {
    "hardsigmoid": (1.0 / 256.0, -128),
    "sigmoid": (1.0 / 256.0, -128),
    "softmax": (1.0 / 256.0, -128),
    "tanh": (1.0 / 128.0, 0),
    "log_softmax": (16.0 / 256.0, 127),  # TFLite LOG_SOFTMAX: outputs in [-16, 0)
}


QAT_ACT_AVERAGING = 0.01  # EMA constant of activation ranges in QAT (torch's default for QAT observers)


def activation_observer(config: QuantConfig, relu6: str | None = None, *, is_qat: bool = False):
    """Observer constructor for int8 asymmetric per-tensor activations (:mod:`.observers`).

    ``relu6``: ``None`` (ordinary tensor), ``"clamped"`` ([0, min(6, calibrated max)]) or ``"fixed"``
    (exactly [0, 6], no calibration). In QAT the range follows the training weights, so the method is
    always a moving average, whatever ``config.calibration`` says.
    """
    if is_qat:
        return observers.make_activation_observer(
            "moving_average", relu6=relu6, averaging_constant=QAT_ACT_AVERAGING
        )
    opts = {"percentile": config.percentile} if config.calibration == "percentile" else {}
    return observers.make_activation_observer(config.calibration, relu6=relu6, **opts)


def weight_observer(config: QuantConfig, *, is_qat: bool = False):
    """Observer constructor for symmetric int8 weights (zero point 0), per output channel or per tensor.

    QAT: a moving-average min/max with averaging constant 1, i.e. the range of the current weights at
    every step (a plain min/max would never shrink while the weights move).
    """
    if is_qat:
        cls = MovingAveragePerChannelMinMaxObserver if config.per_channel else MovingAverageMinMaxObserver
        return cls.with_args(averaging_constant=1.0)
    return observers.make_weight_observer(config.per_channel, 0, bits=config.weight_bits)


def _fake_quant(observer, learn_scales: bool):
    if learn_scales:  # LSQ (Esser et al. 2020): scale gradient normalised by sqrt(numel · qmax)
        return LearnableFakeQuantize.with_args(observer=observer, use_grad_scaling=True)
    return FakeQuantize.with_args(observer=observer)


def _is_fixed(ctr) -> bool:
    func = getattr(getattr(ctr, "p", None), "func", ctr)
    return isinstance(func, type) and issubclass(func, FixedQParamsObserver)


class ClampedRangeObserver(ObserverBase):
    """Observes ``clamp(x, lo, hi)`` (per-channel bound constants) with an inner activation observer.

    For ``conv → clamp.Tensor``: TFLite has no fused per-channel clamp, so the conv output is quantized
    and the clamp (MINIMUM / MAXIMUM, same parameters in and out) follows. Observing the conv output
    through the clamp gives that shared range the clamp's output range (``[0, max_i hi_i]``, zero point
    −128), so the pair computes what one fused op would. Written here because torchao's observers have no
    input transform.
    """

    def __init__(self, observer, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                 dtype=torch.int8, qscheme=torch.per_tensor_affine, quant_min=INT8_MIN, quant_max=INT8_MAX,
                 is_dynamic=False, **kwargs):
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.inner = observer(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.qscheme, self.quant_min, self.quant_max = qscheme, quant_min, quant_max
        self.register_buffer("lo", None if lo is None else lo.detach().clone())
        self.register_buffer("hi", None if hi is None else hi.detach().clone())

    def forward(self, x):
        self.inner(torch.clamp(x.detach(), self.lo, self.hi))
        return x

    def calculate_qparams(self):
        return self.inner.calculate_qparams()

    @property
    def min_val(self):
        return getattr(self.inner, "min_val", None)

    @property
    def max_val(self):
        return getattr(self.inner, "max_val", None)


def _derive_bias_qparams(obs_or_fqs) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite bias parameters: scale = input scale × weight scale (per channel), zero point 0."""
    act_obs, w_obs = obs_or_fqs
    act_scale, _ = act_obs.calculate_qparams()
    w_scale, _ = w_obs.calculate_qparams()
    scale = (act_scale.to(torch.float64) * w_scale.to(torch.float64)).to(torch.float32)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _leaky_output(s_in: float, zp_in: float, slope: float) -> tuple[float, int, float]:
    """A LeakyReLU's int8 output (scale, zero point) and the negative slope the int8 kernel computes, from
    its input's parameters: the range is the input's mapped through the op (monotonic), and the scale is
    snapped so that ``k = 256 · s_in / s_out`` is an integer.

    XNNPACK's int8 LEAKY_RELU keeps both of its multipliers with 8 fractional bits: ``floor((x · k + 128) /
    256)`` for x ≥ 0 and ``floor((x · round(256 · slope · s_in / s_out) + 128) / 256)`` below (x the input
    code less its zero point). With any other scale its output was a step off the exact one on up to 2.7 %
    of elements (EffNet), which the simulation and ONNX Runtime compute. The snapped scale is the next
    larger that the kernel represents exactly with an odd ``k`` (< 0.8 % coarser; no clipping; odd, so
    ``x · k / 256`` is a rounding tie only at |x| = 128). The negative side is exact only if
    ``m = slope · k`` is an integer too — with slope 0.01 and k near 256 the kernel computes slope 3/256,
    not 2.56/256 — and odd (or 0): with m = 46 every input at x = −64 or −192 is a tie, which the kernel
    rounds up and the simulation to even (0.13 % of a layer's elements a step off). So the slope the graph
    computes is the kernel's, ``m / k`` with m the odd integer (or 0) nearest to ``slope · k``: the file's
    op carries it and ONNX Runtime computes it. It is within 1/k of the float slope, which moves an output
    by at most |x|/256 of a step (under one step). Slopes outside (0, 1) are kept as they are.
    """
    lo_in, hi_in = (INT8_MIN - zp_in) * s_in, (INT8_MAX - zp_in) * s_in
    ends = (lo_in * slope if lo_in < 0 else lo_in, hi_in * slope if hi_in < 0 else hi_in)
    lo, hi = min(min(ends), 0.0), max(max(ends), 0.0)
    observed = max((hi - lo) / (INT8_MAX - INT8_MIN), 1e-12)
    k = max(math.floor(256.0 * s_in / observed), 1)
    k = k if k % 2 else max(k - 1, 1)
    scale = 256.0 * s_in / k
    kernel_slope = _odd_or_zero_nearest(slope * k) / k if 0.0 < slope < 1.0 else slope
    lo = min(lo_in * kernel_slope, 0.0) if lo_in < 0 else lo
    zero_point = min(max(round(INT8_MIN - lo / scale), INT8_MIN), INT8_MAX)
    return scale, zero_point, kernel_slope


def _odd_or_zero_nearest(v: float) -> int:
    odd = 2 * math.floor(v / 2) + 1
    return 0 if v < abs(odd - v) else odd


def _derive_leaky_qparams(obs_or_fqs, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A LeakyReLU's output parameters, from its input's observer (see :func:`_leaky_output`)."""
    (in_obs,) = obs_or_fqs
    s_in, zp_in = (float(t.reshape(-1)[0]) for t in in_obs.calculate_qparams())
    scale, zero_point, _ = _leaky_output(s_in, zp_in, slope)
    return torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32)


_LEAKY_SLOPE = "mobilequant_leaky_slope"  # node.meta: the model's own slope, before _snap_leaky_slopes


def _snap_leaky_slopes(prepared) -> None:
    """Give every quantized LeakyReLU of a calibrated (prepared) graph the negative slope its int8 kernel
    computes at its parameters (:func:`_leaky_output`), so the simulation, the bias correction that runs on
    it and the exported ops compute what XNNPACK does. Run again after ranges change: it starts from the
    model's slope each time."""
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.leaky_relu.default, aten.leaky_relu_.default):
            continue
        x = node.args[0]
        obs = prepared.get_submodule(str(x.target)) if getattr(x, "op", None) == "call_module" else None
        if obs is None or not hasattr(obs, "calculate_qparams"):
            continue  # not quantized (float fallback)
        slope = node.meta.setdefault(
            _LEAKY_SLOPE, float(node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)))
        s_in, zp_in = (float(t.reshape(-1)[0]) for t in obs.calculate_qparams())
        kernel_slope = _leaky_output(s_in, zp_in, slope)[2]
        node.args = (x, kernel_slope, *node.args[2:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "negative_slope"}
    prepared.recompile()


# ------------------------------------------------------------------------ TFLite's int8 HARD_SWISH kernel
#
# Hand-written because no library exposes it: TFLite's fixed-point HARD_SWISH runs only inside the
# interpreter, on whole tensors, and the quantizer needs its 256-entry table for candidate scales it has
# not yet written into any file. The model follows tensorflow/lite/kernels/activations.cc
# (``HardSwishPrepare``) and kernels/internal/reference/hard_swish.h (``HardSwish``, the int8 path; XNNPACK's
# QS8 hardswish gives the same table), and reproduces the tables of real files code for code
# (tests/test_hardswish_kernel.py; 21 of 21 layers of a MobileNetV3-Large file).

_I16_MIN, _I16_MAX = -(2**15), 2**15 - 1


def _quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``m ≈ q · 2^(shift − 31)``, q a Q31 in [2^30, 2^31)."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    fixed = int(math.floor(q * (1 << 31) + 0.5))  # TfLiteRound (half away from zero; q > 0 here)
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def _int16_multiplier(m32: int) -> int:
    """``DownScaleInt32ToInt16Multiplier``: the Q31 multiplier rounded to Q15."""
    return _I16_MAX if m32 >= INT32_MAX - (1 << 15) else (m32 + (1 << 15)) >> 16


def _doubling_high_mul16(a: np.ndarray, b, rounding: bool) -> np.ndarray:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` (int16) or TFLite's ``SaturatingDoublingHighMul``:
    ``a · b / 2^15``, C division (towards zero), with or without the ±2^14 nudge."""
    ab = a * b
    if rounding:
        ab = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    out = np.sign(ab) * (np.abs(ab) >> 15)
    return np.where((a == b) & (a == _I16_MIN), _I16_MAX, out)


def _rounding_divide_by_pot(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent``, ties away from zero."""
    if exponent <= 0:
        return x
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def hardswish_kernel_table(s_in: float, zp_in: int, s_out: float, zp_out: int) -> np.ndarray:
    """The int8 output codes TFLite's HARD_SWISH computes for the 256 input codes −128..127 (index
    ``code + 128``) at these parameters (float32, as the file stores them).

    Prepare: the input on a "hires" scale ``s_in/128`` (the code less its zero point times 128, int16); an
    output multiplier ``(s_in/128)/s_out`` and a "reluish" multiplier ``(s_in/128)/(3/32768)``, each a Q31
    from ``QuantizeMultiplier`` rounded to Q15. Kernel: the hires input times the output multiplier
    (rounding doubling high mul); the reluish value — the input rescaled so that 3.0 is 2^15, saturating
    left shift or rounding right shift by the reluish exponent — mapped from [−1, 1] to [0, 1] by
    ``(v + 2^15) >> 1``; their product by the non-rounding doubling high mul; a rounding right shift by the
    output exponent; plus the output zero point, clamped to int8. Its one-step differences from the exact
    ``round(hardswish(x)/s_out)`` come from the Q15 multipliers and the truncating final product.
    """
    s_in32, s_out32 = np.float32(s_in), np.float32(s_out)
    hires = np.float32(1.0 / 128.0) * s_in32
    out_fixed, out_exp = _quantize_multiplier(float(np.float32(hires / s_out32)))
    relu_fixed, relu_exp = _quantize_multiplier(float(np.float32(hires / np.float32(3.0 / 32768.0))))
    out_m16, relu_m16 = _int16_multiplier(out_fixed), _int16_multiplier(relu_fixed)
    x = (np.arange(INT8_MIN, INT8_MAX + 1, dtype=np.int64) - int(zp_in)) * 128
    on_output = _doubling_high_mul16(x, out_m16, rounding=True)
    reluish = x
    if relu_exp > 0:
        reluish = np.clip(reluish * (1 << (relu_exp - 1)), _I16_MIN, _I16_MAX)
    reluish = _doubling_high_mul16(reluish, relu_m16, rounding=True)
    if relu_exp > 0:
        reluish = np.clip(reluish * 2, _I16_MIN, _I16_MAX)
    elif relu_exp < 0:
        reluish = _rounding_divide_by_pot(reluish, -relu_exp)
    reluish = (reluish + (1 << 15)) >> 1
    out = _rounding_divide_by_pot(_doubling_high_mul16(reluish, on_output, rounding=False), -out_exp)
    return np.clip(out + int(zp_out), INT8_MIN, INT8_MAX)


def hardswish_exact_table(s_in: float, zp_in: int, s_out: float, zp_out: int) -> np.ndarray:
    """What the simulation (and ONNX Runtime) computes for the 256 input codes: torch's dequantize,
    ``hardswish`` and quantize (round half to even) in float32."""
    qd = torch.ops.quantized_decomposed
    codes = torch.arange(INT8_MIN, INT8_MAX + 1, dtype=torch.int8)
    y = torch.nn.functional.hardswish(qd.dequantize_per_tensor(codes, s_in, int(zp_in), INT8_MIN, INT8_MAX,
                                                               torch.int8))
    return qd.quantize_per_tensor(y, s_out, int(zp_out), INT8_MIN, INT8_MAX, torch.int8).numpy().astype(np.int64)


HARDSWISH_SNAP_STEP = 1e-5  # relative step of the output-scale search (the Q15 multiplier moves ~3e-5)
HARDSWISH_SNAP_BOUND = 2e-3  # largest relative move of a hardswish output scale


def _exact_hardswish_scale(s_in: float, zp_in: int, s_out: float, zp_out: int) -> float | None:
    """The float32 output scale nearest ``s_out`` (larger first on equal distance, which clips nothing),
    within ``HARDSWISH_SNAP_BOUND`` relative, at which TFLite's HARD_SWISH table equals the simulation's for
    every input code; ``None`` if there is none."""
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  (registers ops)

    steps = int(round(HARDSWISH_SNAP_BOUND / HARDSWISH_SNAP_STEP))
    seen: set[float] = set()
    for i in range(steps + 1):
        for sign in ((1,) if i == 0 else (1, -1)):
            s = float(np.float32(s_out * (1.0 + sign * i * HARDSWISH_SNAP_STEP)))
            if s in seen or s <= 0.0:
                continue
            seen.add(s)
            if np.array_equal(hardswish_kernel_table(s_in, zp_in, s, zp_out),
                              hardswish_exact_table(s_in, zp_in, s, zp_out)):
                return s
    return None


_SNAP_BASE = "_mobilequant_unsnapped_qparams"  # observer attribute: its qparams before the hardswish snap


def snap_hardswish_scales(prepared) -> list[tuple[str, str]]:
    """Move every quantized hardswish's output scale, by at most ``HARDSWISH_SNAP_BOUND`` relative, to one
    at which TFLite's int8 HARD_SWISH (:func:`hardswish_kernel_table`) computes exactly what the simulation
    and ONNX Runtime compute for all 256 input codes; the zero point is kept. With the calibrated scale the
    kernel was one step off on 1–2 codes in most layers, and a deep MobileNetV3 amplified that (file vs
    simulation top-1 83 %). The scale is pinned on the output's observer (:func:`observers.pin_qparams`), so
    the biases derived from it follow. Run again after ranges change: it starts from the observer's own
    parameters each time. Returns ``(layer, message)`` for each hardswish left at its calibrated scale
    because no exact one lies within the bound."""
    unsnapped: list[tuple[str, str]] = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.hardswish.default, aten.hardswish_.default):
            continue
        x, outs = node.args[0], [u for u in node.users if u.op == "call_module"]
        if getattr(x, "op", None) != "call_module" or len(outs) != 1:
            continue  # not quantized (float fallback)
        in_obs, out_obs = prepared.get_submodule(str(x.target)), prepared.get_submodule(str(outs[0].target))
        if not (hasattr(in_obs, "calculate_qparams") and hasattr(out_obs, "calculate_qparams")) or isinstance(
                out_obs, FixedQParamsObserver):
            continue
        pinned = getattr(out_obs, _SNAP_BASE, None)
        base = pinned[1] if pinned is not None and pinned[0] is out_obs.__dict__.get("calculate_qparams") \
            else out_obs.calculate_qparams
        s_in, zp_in = (float(t.reshape(-1)[0]) for t in in_obs.calculate_qparams())
        scale, zero_point = base()
        s_out, zp_out = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
        exact = _exact_hardswish_scale(s_in, int(zp_in), s_out, zp_out)
        if exact is None:
            unsnapped.append((layer_name(node), f"no output scale within {HARDSWISH_SNAP_BOUND:.1%} of "
                              f"{s_out:.6g} makes TFLite's HARD_SWISH exact; calibrated scale kept"))
            exact = s_out
        observers.pin_qparams(out_obs, torch.full_like(scale, exact), zero_point)
        setattr(out_obs, _SNAP_BASE, (out_obs.__dict__["calculate_qparams"], base))
    return unsnapped


def snap_to_kernels(prepared) -> list[tuple[str, str]]:
    """Make the quantized ops whose int8 TFLite kernels are not exact at arbitrary parameters compute what
    the simulation computes: LeakyReLU slopes (:func:`_snap_leaky_slopes`) and hardswish output scales
    (:func:`snap_hardswish_scales`, whose unsnapped layers it returns). Run after calibration and again
    after anything that moves ranges."""
    unsnapped = snap_hardswish_scales(prepared)  # first: a leaky slope depends on its input's scale
    _snap_leaky_slopes(prepared)
    return unsnapped


@dataclass(frozen=True)
class _StaticGlobalConfig:
    """What ``litert_torch.quantize.quant_config.QuantConfig`` reads from a quantizer: static, not dynamic."""

    is_dynamic: bool = False
    is_qat: bool = False


class MobileQuantizer(Quantizer):
    """PT2E quantizer for the TFLite int8 scheme, configured by a :class:`QuantConfig`."""

    def __init__(self, config: QuantConfig | None = None, *, is_qat: bool = False, learn_scales: bool = False):
        super().__init__()
        self.config = config or QuantConfig()
        self.is_qat = is_qat
        self.learn_scales = learn_scales
        if learn_scales and not is_qat:
            raise UsageError("learn_scales=True needs is_qat=True (scales are learned while training)")
        self.global_config = _StaticGlobalConfig(is_qat=is_qat)
        cfg = self.config
        self._act_observer = activation_observer(cfg, is_qat=is_qat)
        self.act_spec = QuantizationSpec(
            dtype=torch.int8,
            observer_or_fake_quant_ctr=self._ctr(self._act_observer),
            quant_min=INT8_MIN,
            quant_max=INT8_MAX,
            qscheme=torch.per_tensor_affine,
        )
        self.relu6_spec = QuantizationSpec(
            dtype=torch.int8,
            observer_or_fake_quant_ctr=self._ctr(activation_observer(cfg, relu6=cfg.relu6, is_qat=is_qat)),
            quant_min=INT8_MIN,
            quant_max=INT8_MAX,
            qscheme=torch.per_tensor_affine,
        )
        self.weight_spec = QuantizationSpec(
            dtype=torch.int8,
            observer_or_fake_quant_ctr=self._ctr(weight_observer(cfg, is_qat=is_qat)),
            quant_min=-cfg.weight_qmax,
            quant_max=cfg.weight_qmax,
            qscheme=torch.per_channel_symmetric if cfg.per_channel else torch.per_tensor_symmetric,
            ch_axis=0 if cfg.per_channel else None,
        )
        self._annotators = {
            Rule.WEIGHTED: self._annotate_weighted,
            Rule.BINARY: self._annotate_binary,
            Rule.SHARED: self._annotate_shared,
            Rule.SPLIT: self._annotate_split,
            Rule.FIXED: self._annotate_fixed,
            Rule.OWN: self._annotate_own,
            Rule.CLAMP: self._annotate_clamp,
            Rule.LEAKY: self._annotate_leaky,
        }

    # litert_torch's QuantConfig(pt2e_quantizer=...) reads ``global_config.is_dynamic`` (set in __init__).

    def _ctr(self, observer):
        """PTQ: the observer; QAT: a fake-quant around it (fixed parameters are never learned)."""
        if not self.is_qat:
            return observer
        return _fake_quant(observer, self.learn_scales and not _is_fixed(observer))

    def supported_ops(self) -> frozenset:
        """Ops this quantizer annotates (QAT also keeps the training graph's batch norms)."""
        return frozenset(OP_RULES) | (BN_OPS if self.is_qat else frozenset())

    # ------------------------------------------------------------------------------------ Quantizer API

    def annotate(self, model: GraphModule) -> GraphModule:
        self._model = model  # constants (clamp bounds) are read from it
        for node in model.graph.nodes:
            if node.op != "call_function" or is_structural(node) or _is_annotated(node):
                continue
            if is_bn_bookkeeping(node):
                _annotate(node, {}, None)  # BN step counter in a training graph, not a tensor ADD
                continue
            rule = OP_RULES.get(node.target)
            if rule is not None:
                self._annotators[rule](node)
        return model

    def validate(self, model: GraphModule) -> None:
        if self.config.float_fallback:
            return
        bad = find_unsupported_ops(model, self.supported_ops())
        if bad:
            listed = ", ".join(f"{name} ({op})" for name, op in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise InputError(
                f"{len(bad)} op(s) have no TFLite int8 kernel rule: {listed}{more}; export to a float target "
                "(tflite-fp32, tflite-fp16, onnx-fp32, onnx-fp16), or keep them in float inside the int8 model: "
                "--set quantization.float_fallback=true (recipe key quantization.float_fallback, "
                "QuantConfig(float_fallback=True))"
            )

    # ------------------------------------------------------------------------------------- helpers

    def _input_spec(self, arg: Node) -> QuantizationSpecBase:
        """An input edge reuses its producer's output parameters when the producer is quantized."""
        ann = arg.meta.get(Q_KEY)
        if ann is not None and ann.output_qspec is not None:
            return SharedQuantizationSpec(arg)
        return self.act_spec

    def _bias_spec(self, x: Node, w: Node, node: Node) -> DerivedQuantizationSpec:
        per_channel = self.config.per_channel
        return DerivedQuantizationSpec(
            derived_from=[(x, node), (w, node)],
            derive_qparams_fn=_derive_bias_qparams,
            dtype=torch.int32,
            quant_min=INT32_MIN,
            quant_max=INT32_MAX,
            qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
            ch_axis=0 if per_channel else None,
        )

    def _output_or_fused_activation(self, node: Node) -> QuantizationSpecBase | None:
        """Annotate a fusible ReLU / ReLU6 / clamp after ``node`` and return None, or return ``node``'s spec.

        Any clamp with number bounds fuses: with no quantize between the two ops the converter makes it the
        op's fused activation (RELU, RELU_N1_TO_1, RELU6) or MINIMUM / MAXIMUM on the op's output, which
        keep its parameters — either way one output tensor, quantized after the clamp, as simulated. (With
        a range of their own on both, the converter fused them anyway: the file missed the conv's range.)"""
        users = list(node.users)
        if len(users) == 1 and not _is_annotated(users[0]) and users[0].args[0] is node:
            act = users[0]
            if clamp_bounds(act) is not None:
                _annotate(act, {}, self.relu6_spec if activation_kind(act) == "relu6" else self.act_spec)
                act.meta[FUSED_INTO] = layer_name(node)
                return None
            bounds = self._clamp_bounds(act)
            if bounds is not None:
                observer = ClampedRangeObserver.with_args(observer=self._act_observer, lo=bounds[0], hi=bounds[1])
                _annotate(act, {node: SharedQuantizationSpec(node)}, SharedQuantizationSpec(node))
                act.meta[FUSED_INTO] = layer_name(node)
                return dataclasses.replace(self.act_spec, observer_or_fake_quant_ctr=self._ctr(observer))
        return self.act_spec

    def _clamp_bounds(self, node: Node) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """Constant bounds of a ``clamp.Tensor`` node, or None (other op, or bounds computed at runtime)."""
        if node.target != aten.clamp.Tensor:
            return None
        bounds = []
        for i, name in ((1, "min"), (2, "max")):
            b = node.args[i] if len(node.args) > i else node.kwargs.get(name)
            if b is None:
                bounds.append(None)
            elif isinstance(b, Node) and b.op == "get_attr":
                value = self._model
                for part in str(b.target).split("."):
                    value = getattr(value, part)
                bounds.append(value)
            else:
                return None
        return bounds[0], bounds[1]

    def _tensor_inputs(self, node: Node) -> dict[Node, QuantizationSpecBase]:
        return {a: self._input_spec(a) for a in node.args if isinstance(a, Node)}

    # ----------------------------------------------------------------------------------- annotators

    def _annotate_weighted(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        inputs = {x: self._input_spec(x), w: self.weight_spec}
        if isinstance(b, Node):
            inputs[b] = self._bias_spec(x, w, node)
        users = list(node.users)
        bn = users[0] if self.is_qat and len(users) == 1 and users[0].target in BN_OPS else None
        if bn is None:
            _annotate(node, inputs, self._output_or_fused_activation(node))
            return
        # QAT: conv → BN [→ ReLU/ReLU6] is one layer; torchao folds the BN while training.
        _annotate(node, inputs, None)
        out = self._output_or_fused_activation(bn)
        _annotate(bn, {}, out)
        if out is None:
            next(iter(bn.users)).meta[FUSED_INTO] = layer_name(node)
        else:
            bn.meta[FUSED_INTO] = layer_name(node)

    def _annotate_binary(self, node: Node) -> None:
        _annotate(node, self._tensor_inputs(node), self._output_or_fused_activation(node))

    def _annotate_shared(self, node: Node) -> None:
        first = node.args[0]
        if node.target == aten.cat.default:
            tensors = [t for t in first if isinstance(t, Node)]
            first = tensors[0]
            self._unmix_relu6(tensors)
            inputs = {first: self._input_spec(first)}
            for t in tensors[1:]:
                inputs.setdefault(t, SharedQuantizationSpec((first, node)))
        else:
            inputs = {first: self._input_spec(first)}
        _annotate(node, inputs, SharedQuantizationSpec((first, node)))

    def _annotate_split(self, node: Node) -> None:
        x = node.args[0]
        _annotate(node, {x: self._input_spec(x)}, None)
        for user in node.users:
            if user.target is operator.getitem:
                _annotate(user, {}, SharedQuantizationSpec((x, node)))

    def _annotate_fixed(self, node: Node) -> None:
        scale, zero_point = FIXED_QPARAMS[_short(node)]
        spec = FixedQParamsQuantizationSpec(
            dtype=torch.int8,
            scale=scale,
            zero_point=zero_point,
            quant_min=INT8_MIN,
            quant_max=INT8_MAX,
            qscheme=torch.per_tensor_affine,
        )
        x = node.args[0]
        _annotate(node, {x: self._input_spec(x)}, spec)

    def _annotate_own(self, node: Node) -> None:
        x = node.args[0]
        _annotate(node, {x: self._input_spec(x)}, self.act_spec)

    def _annotate_leaky(self, node: Node) -> None:
        x = node.args[0]
        slope = float(node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01))
        spec = DerivedQuantizationSpec(
            derived_from=[(x, node)],
            derive_qparams_fn=functools.partial(_derive_leaky_qparams, slope=slope),
            dtype=torch.int8,
            quant_min=INT8_MIN,
            quant_max=INT8_MAX,
            qscheme=torch.per_tensor_affine,
        )
        _annotate(node, {x: self._input_spec(x)}, spec)

    def _annotate_clamp(self, node: Node) -> None:
        """A clamp no conv / linear / add took as its fused activation: ReLU and ReLU6 get their own range
        (RELU / RELU6 requantize), any other bounds their input's — they lower to MINIMUM / MAXIMUM, whose
        int8 form needs the same parameters in and out (an own range there was a file computing something
        else than the simulation)."""
        kind = activation_kind(node)
        if kind is None:
            self._annotate_shared(node)
            return
        x = node.args[0]
        _annotate(node, {x: self._input_spec(x)}, self.relu6_spec if kind == "relu6" else self.act_spec)

    def _unmix_relu6(self, tensors: list[Node]) -> None:
        """A concat shares one range across its inputs: a ReLU6 range there only holds if all are ReLU6.

        Otherwise the ReLU6 producers get the ordinary activation spec (their values still lie in
        [0, 6]; the group range is then calibrated over all inputs).
        """
        roots = [_root_producer(t) for t in tensors]
        specs = [r.meta[Q_KEY].output_qspec if r is not None else None for r in roots]
        if any(s is self.relu6_spec for s in specs) and not all(s is self.relu6_spec for s in specs):
            for r, s in zip(roots, specs):
                if s is self.relu6_spec:
                    r.meta[Q_KEY].output_qspec = self.act_spec


def is_bn_bookkeeping(node: Node) -> bool:
    """``add_(num_batches_tracked, 1)``: a BN's step counter in a training graph."""
    return (node.op == "call_function" and node.target == aten.add_.Tensor
            and isinstance(node.args[0], Node) and node.args[0].op == "get_attr")


def _annotate(node: Node, inputs: dict, output: QuantizationSpecBase | None) -> None:
    node.meta[Q_KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


def _is_annotated(node: Node) -> bool:
    ann = node.meta.get(Q_KEY)
    return ann is not None and ann._annotated


def _short(node: Node) -> str:
    name = node.target._schema.name.split("::")[-1].rstrip("_")
    return name.lstrip("_")


def _root_producer(node: Node) -> Node | None:
    """Follow shared output specs back to the node whose output spec owns the parameters."""
    seen = set()
    while node is not None and node not in seen:
        seen.add(node)
        ann = node.meta.get(Q_KEY)
        if ann is None or ann.output_qspec is None:
            return None
        spec = ann.output_qspec
        if not isinstance(spec, SharedQuantizationSpec):
            return node
        target = spec.edge_or_node
        node = target[0] if isinstance(target, tuple) else target
    return None


def op_table() -> list[tuple[str, str]]:
    """(op, rule) rows of :data:`OP_RULES`, sorted, for documentation."""
    return sorted((str(op), rule.value) for op, rule in OP_RULES.items())

