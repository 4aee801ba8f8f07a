"""Weight and channel health: dead depthwise kernels and what ruins int8, before and after quantization.

Checks (``Finding.check``), per output channel of every depthwise and pointwise layer (range spread:
every conv / linear layer):

``dead_kernel``
    float: the kernel is exactly zero. quantized: every code of the channel is the zero point in the
    artifact (a kernel alive in float but dead in the file was killed by quantization). The channel then
    outputs a constant (the folded BN bias): compute spent on nothing.
``weak_kernel``
    float: L2 norm below ``weak_kernel_rel`` × the layer's median norm. With per-tensor weights it rounds
    to zero or to a handful of codes.
``bn_gamma_zero``
    float: ``|γ|`` below ``bn_gamma_rel`` × the layer's median ``|γ|`` (or exactly 0): after folding the
    kernel is ~0 whatever the conv weights are.
``bn_variance_zero``
    float: the BN's running variance is 0 (at most ``mobilequant.fusion.DEAD_VARIANCE``): the channel was
    constant on the data the statistics came from (usually its input channels never fire); the fold
    makes it the constant β, so its kernel is all zero codes in the artifact (dead before quantization).
``dead_activation``
    the channel's post-ReLU/ReLU6 output is 0 on every image of the evaluation set (float: the torch
    reference; quantized: the artifact's tensor).
``range_spread``
    max / median of the per-channel weight range (folded kernel, as quantized). Per-tensor int8 gives the
    median channel only ~127 / spread codes.
``single_code``
    quantized: every weight of the channel has the same code, the kernel is a constant.
``kernel_mismatch``
    quantized: the artifact's dequantized kernel is far from the float model's folded kernel (weight
    SQNR below ``kernel_mismatch_db``; int8 rounding alone stays above ~30 dB): a wrong weight scale or
    corrupted weights in the file. The layer's isolated SQNR shows what it costs.

Severities: ``error`` fails the gate when ``fail_on_dead_kernels`` is set (dead kernels and zero γ in
depthwise layers, and kernels killed by quantization anywhere); ``warning`` is reported (dead
activations among them: trained networks commonly have ReLU channels that never fire on a data set, a
training property rather than a defect of the file); ``info`` is context (e.g. a range spread that
per-channel quantization already absorbs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..fusion import DEAD_VARIANCE
from .layers import FusedLayer
from .weights import QuantizedWeights

__all__ = ["Finding", "HealthThresholds", "DEAD_CHECKS", "float_weight_findings", "quantized_weight_findings",
           "dead_activation_findings", "kernel_mismatch_findings", "kernel_norms", "REMEDY"]

DEAD_CHECKS = ("dead_kernel", "bn_gamma_zero", "bn_variance_zero", "dead_activation")
_KERNEL_KINDS = ("depthwise", "pointwise")
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

REMEDY = {
    "remove": "remove the dead channels (prune this output channel and the matching input of the next layer; "
              "its constant output can be folded into the next layer's bias)",
    "per_channel": "quantize the weights per channel (QuantConfig(per_channel=True))",
    "cle": "apply cross-layer equalization (QuantConfig(cle=True)) to even out the channel ranges",
}


@dataclass(frozen=True)
class Finding:
    """One health problem: which layer and channels, why it matters, what to do."""

    check: str
    layer: str
    layer_kind: str
    stage: str  # "float" (the torch model) | "quantized" (the artifact)
    severity: str  # "error" | "warning" | "info"
    channels: tuple[int, ...]
    why: str
    remedy: str
    value: float | None = None  # the measured quantity (spread ratio, smallest relative norm, ...)
    channel_count: int = 0  # channels in the layer
    layer_index: int = -1  # position of the layer along the network (for ordering)

    @property
    def sort_key(self):
        return (_SEVERITY_ORDER.get(self.severity, 9), self.layer_index, self.check, self.stage)

    def to_dict(self) -> dict:
        return {"check": self.check, "layer": self.layer, "layer_kind": self.layer_kind, "stage": self.stage,
                "severity": self.severity, "channels": list(self.channels), "channel_count": self.channel_count,
                "value": self.value, "why": self.why, "remedy": self.remedy, "layer_index": self.layer_index}


@dataclass(frozen=True)
class HealthThresholds:
    """Thresholds of the health checks (all relative, so they hold for any weight scale)."""

    weak_kernel_rel: float = 0.01  # kernel norm < this × the layer's median norm
    bn_gamma_rel: float = 1e-3  # |γ| < this × the layer's median |γ|
    range_spread: float = 10.0  # max / median per-channel weight range
    kernel_mismatch_db: float = 10.0  # artifact kernel vs float kernel SQNR below this: wrong scale / weights
    kinds: tuple[str, ...] = field(default=_KERNEL_KINDS)  # layer kinds whose kernels are checked per channel


def _channel_norms(w: np.ndarray) -> np.ndarray:
    return np.sqrt((w.reshape(w.shape[0], -1).astype(np.float64) ** 2).sum(axis=1))


def kernel_norms(layers: Iterable[FusedLayer], kinds: tuple[str, ...] = _KERNEL_KINDS) -> dict[str, np.ndarray]:
    """Per-channel L2 norm of each float kernel of ``kinds``, divided by the layer's median norm."""
    out = {}
    for layer in layers:
        if layer.kind in kinds and layer.weight is not None:
            n = _channel_norms(layer.weight)
            med = float(np.median(n))
            out[layer.name] = n / med if med > 0 else n
    return out


def _indexed(findings: list[Finding], layers) -> list[Finding]:
    order = {l.name: i for i, l in enumerate(layers)}
    return [dataclasses.replace(f, layer_index=order.get(f.layer, -1)) for f in findings]


def _ch(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(mask))


def _dead_severity(kind: str) -> str:
    return "error" if kind == "depthwise" else "warning"


def float_weight_findings(layers: Iterable[FusedLayer], th: HealthThresholds = HealthThresholds()) -> list[Finding]:
    """Health of the float model's kernels and BN scales (stage ``float``)."""
    layers = list(layers)
    out: list[Finding] = []
    for layer in layers:
        if layer.weight is None:
            continue
        c = layer.channels
        if layer.kind in th.kinds:
            norms = _channel_norms(layer.weight)
            med = float(np.median(norms))
            dead = norms == 0
            if dead.any():
                out.append(Finding(
                    "dead_kernel", layer.name, layer.kind, "float", _dead_severity(layer.kind), _ch(dead),
                    f"{dead.sum()} of {c} {layer.kind} kernels are all zero: those channels output a constant "
                    "(the BN bias) and waste compute", REMEDY["remove"], 0.0, c))
            weak = (norms > 0) & (norms < th.weak_kernel_rel * med)
            if weak.any():
                rel = float((norms[weak] / med).min())
                out.append(Finding(
                    "weak_kernel", layer.name, layer.kind, "float", "warning", _ch(weak),
                    f"{weak.sum()} kernels have a norm below {th.weak_kernel_rel:g} × the layer median "
                    f"(smallest {rel:.2g}×): per-tensor int8 rounds them to zero or a few codes",
                    f"{REMEDY['per_channel']}; or {REMEDY['cle']}; if they carry nothing, {REMEDY['remove']}", rel, c))
            if layer.bn_var is not None:
                const = layer.bn_var <= DEAD_VARIANCE
                if const.any():
                    out.append(Finding(
                        "bn_variance_zero", layer.name, layer.kind, "float", _dead_severity(layer.kind), _ch(const),
                        f"BatchNorm {layer.bn}: running variance 0 on {const.sum()} of {c} channels: they were "
                        "constant (the BN bias) on the data the statistics came from — usually their input "
                        "channels never fire. Folded literally their kernels would be W·γ/√ε ≈ 300× W; "
                        "mobilequant folds them to the constant", REMEDY["remove"], 0.0, c))
            if layer.bn_gamma is not None:
                g = np.abs(layer.bn_gamma)
                gmed = float(np.median(g))
                low = (g == 0) | (g < th.bn_gamma_rel * gmed)
                if low.any():
                    out.append(Finding(
                        "bn_gamma_zero", layer.name, layer.kind, "float", _dead_severity(layer.kind), _ch(low),
                        f"BatchNorm {layer.bn}: γ ≈ 0 on {low.sum()} of {c} channels (below {th.bn_gamma_rel:g} × "
                        "median |γ|): after folding the kernel is ~0 and the channel is a constant",
                        REMEDY["remove"], float(g[low].max() / gmed) if gmed > 0 else 0.0, c))
        folded = layer.folded_weight()
        if layer.kind in ("depthwise", "pointwise", "conv", "linear") and c > 1:
            rng = np.abs(folded.reshape(c, -1)).max(axis=1)
            med = float(np.median(rng))
            if med > 0:
                spread = float(rng.max() / med)
                if spread > th.range_spread:
                    wide = rng > th.range_spread * med
                    out.append(Finding(
                        "range_spread", layer.name, layer.kind, "float", "info", _ch(wide),
                        f"per-channel weight ranges (BN folded) spread {spread:.1f}× (max / median): with one scale "
                        f"per tensor the median channel gets ~{127 / spread:.0f} of 127 codes",
                        f"{REMEDY['per_channel']}; or {REMEDY['cle']}", spread, c))
    return _indexed(out, layers)


def quantized_weight_findings(layers: Iterable[FusedLayer], qweights: Mapping[str, QuantizedWeights],
                              th: HealthThresholds = HealthThresholds(), cle_applied: bool = False) -> list[Finding]:
    """Health of the artifact's int8 kernels (stage ``quantized``).

    ``layers``: the float layers the artifact was quantized from (after CLE when it was applied, so the
    range spread is the one the quantizer saw). ``cle_applied`` tailors the remedies.
    """
    layers = list(layers)
    out: list[Finding] = []
    fix = REMEDY["per_channel"] + ("" if cle_applied else f"; or {REMEDY['cle']}")
    for layer in layers:
        q = qweights.get(layer.name)
        if q is None or layer.weight is None:
            continue
        codes = q.channel_codes()
        if codes.shape[0] != layer.channels:
            continue  # shape mismatch is reported by the layer matching, not here
        c = layer.channels
        zp = q.zero_points().reshape(-1, 1)
        all_zp = (codes == zp).all(axis=1)
        float_dead = _channel_norms(layer.folded_weight()) == 0  # zero kernel, γ = 0 or σ² = 0: dead before
        if layer.kind in th.kinds and all_zp.any():
            killed = all_zp & ~float_dead
            why = f"{all_zp.sum()} of {c} kernels are all zero-point codes in the artifact"
            if killed.any():
                why += (f" ({killed.sum()} of them are non-zero in float: quantization killed them"
                        f"{', scale per tensor' if not q.per_channel else ''})")
            out.append(Finding(
                "dead_kernel", layer.name, layer.kind, "quantized",
                "error" if killed.any() else _dead_severity(layer.kind), _ch(all_zp), why,
                fix if killed.any() else REMEDY["remove"], 0.0, c))
        if layer.kind in th.kinds and codes.shape[1] > 1:
            single = (codes == codes[:, :1]).all(axis=1) & ~all_zp
            if single.any():
                out.append(Finding(
                    "single_code", layer.name, layer.kind, "quantized", "warning", _ch(single),
                    f"{single.sum()} of {c} kernels quantize to a single code: the kernel became a constant "
                    "(its spatial / input pattern is lost)", fix, None, c))
        if not q.per_channel and c > 1:
            rng = np.abs(layer.folded_weight().reshape(c, -1)).max(axis=1)
            med = float(np.median(rng))
            if med > 0 and float(rng.max() / med) > th.range_spread:
                spread = float(rng.max() / med)
                out.append(Finding(
                    "range_spread", layer.name, layer.kind, "quantized", "warning", _ch(rng > th.range_spread * med),
                    f"per-channel weight ranges spread {spread:.1f}× (max / median"
                    f"{', after CLE' if cle_applied else ''}) and the artifact has one scale per tensor: the median "
                    f"channel gets ~{127 / spread:.0f} of 127 codes", fix, spread, c))
    return _indexed(out, layers)


def kernel_mismatch_findings(layers: Iterable[FusedLayer], weight_sqnr: Mapping[str, float],
                             th: HealthThresholds = HealthThresholds()) -> list[Finding]:
    """Layers whose kernel in the artifact is not the float model's kernel (``weight_sqnr`` in dB)."""
    layers = list(layers)
    out = []
    for layer in layers:
        v = weight_sqnr.get(layer.name)
        if v is not None and v < th.kernel_mismatch_db:
            out.append(Finding(
                "kernel_mismatch", layer.name, layer.kind, "quantized", "warning", tuple(range(layer.channels)),
                f"the artifact's dequantized kernel is {v:.1f} dB from the float model's (BN-folded) kernel; int8 "
                "rounding alone gives > 30 dB: a wrong weight scale or corrupted weights",
                "re-export the model; compare this layer's weight scales in the quant table with the file's",
                float(v), layer.channels))
    return _indexed(out, layers)


def dead_activation_findings(layers: Iterable[FusedLayer], channel_max: Mapping[str, np.ndarray], stage: str,
                             images: int, exclude: Mapping[str, set[int]] | None = None,
                             order: Iterable[FusedLayer] | None = None) -> list[Finding]:
    """Channels whose post-ReLU/ReLU6 output is 0 on all ``images`` (``channel_max``: max over the set).

    ``exclude``: channels per layer already reported (the float model's dead channels, when checking the
    artifact: only channels that quantization killed are then reported). ``order``: the network's layers
    (for ``layer_index``; default ``layers``).
    """
    layers = list(layers)
    out = []
    for layer in layers:
        if layer.activation not in ("relu", "relu6") or layer.name not in channel_max:
            continue
        m = np.asarray(channel_max[layer.name])
        dead = m <= 0
        skip = (exclude or {}).get(layer.name, set())
        if skip:
            dead &= ~np.isin(np.arange(m.size), sorted(skip))
        if dead.any():
            where = ("the torch float model" if stage == "float" else
                     "the artifact" + (", alive in the float model" if exclude is not None else ""))
            out.append(Finding(
                "dead_activation", layer.name, layer.kind, stage, "warning", _ch(dead),
                f"{dead.sum()} of {m.size} channels are 0 after the {layer.activation.upper()} on all {images} "
                f"evaluation images ({where}): they carry nothing", REMEDY["remove"], None, int(m.size)))
    return _indexed(out, list(order) if order is not None else layers)
