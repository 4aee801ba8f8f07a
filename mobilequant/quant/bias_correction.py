"""Empirical bias correction of weight quantization error.

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, §4.2. Quantizing a layer's weights ``W`` to ``W_q`` adds ``(W_q − W) x`` to its
output, and that error has a mean: per output channel ``c``, ``E[((W_q − W) * x)_c]`` over the data
(and, for a convolution, over all output positions — border positions see the zero padding, so this is
computed with the layer's own op, not from ``E[x]``). Subtracting the mean from the bias removes the
biased part of the error; per-tensor weight quantization of depthwise layers is where it matters.

:func:`correct_bias` runs the float graph on calibration batches, feeds every conv / linear layer's
float input to the same op with the weight error as weight (no bias), averages, and subtracts the
result from each bias (one pass; all corrections come from float inputs, as in the paper's empirical
variant). Layers without a bias get one. :func:`fake_quantize_weight` is the default weight
quantizer: the observers of :mod:`mobilequant.quant.observers` (what the quantizer uses) with
torchao's ``quantize_affine`` / ``dequantize_affine``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter, Node
from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

from ..capture import layer_name
from ..errors import InputError
from ..fusion import CONV_OPS
from .observers import make_weight_observer

__all__ = ["LayerBiasCorrection", "BiasCorrectionReport", "correct", "correct_bias", "fake_quantize_weight"]

aten = torch.ops.aten
_LINEAR_OPS = frozenset({aten.linear.default})

WeightQuantFn = Callable[[torch.Tensor, bool], torch.Tensor]


def fake_quantize_weight(weight: torch.Tensor, per_channel: bool, *, bits: int = 8) -> torch.Tensor:
    """``weight`` quantized to symmetric int (±(2**(bits−1) − 1), zero point 0) and back to float; one
    scale per output channel (axis 0) or one for the tensor."""
    obs = make_weight_observer(per_channel, 0, bits=bits)()
    w = weight.detach().float()
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    block = (1, *w.shape[1:]) if per_channel else tuple(w.shape)
    q = quantize_affine(w, block, scale, zero_point, torch.int8, obs.quant_min, obs.quant_max)
    return dequantize_affine(q, block, scale, zero_point, torch.int8, obs.quant_min, obs.quant_max).to(weight.dtype)


@dataclass(frozen=True)
class LayerBiasCorrection:
    layer: str
    mean_abs_shift: float  # mean over output channels of |correction|
    max_abs_shift: float
    mean_abs_bias: float  # mean |bias| before, for scale


@dataclass(frozen=True)
class BiasCorrectionReport:
    layers: tuple[LayerBiasCorrection, ...]
    batches: int
    samples: int
    per_channel: bool

    def summary(self) -> str:
        if not self.layers:
            return "bias correction: no layer"
        worst = max(self.layers, key=lambda c: c.max_abs_shift)
        return (f"bias correction: {len(self.layers)} layers from {self.samples} samples "
                f"({'per-channel' if self.per_channel else 'per-tensor'} weights); "
                f"largest shift {worst.max_abs_shift:.3g} at {worst.layer}")


def _get(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layers(gm: GraphModule) -> list[Node]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (CONV_OPS | _LINEAR_OPS):
            w = node.args[1] if len(node.args) > 1 else None
            b = node.args[2] if len(node.args) > 2 else None
            if isinstance(w, Node) and w.op == "get_attr" and (b is None or (isinstance(b, Node) and b.op == "get_attr")):
                out.append(node)
    return out


class _ErrorMeans(Interpreter):
    """Runs the float graph; for each layer, accumulates the per-channel sum of ``op(x, W_q − W)``."""

    def __init__(self, gm: GraphModule, deltas: dict[Node, torch.Tensor]) -> None:
        super().__init__(gm)
        self.deltas = deltas
        self.sums: dict[Node, torch.Tensor] = {}
        self.counts: dict[Node, int] = {}

    def run_node(self, n: Node):
        result = super().run_node(n)
        delta = self.deltas.get(n)
        if delta is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            err = n.target(args[0], delta, None, *args[3:], **kwargs)
            channel_dim = err.dim() - 1 if n.target in _LINEAR_OPS else (1 if err.dim() > 1 else 0)
            dims = [d for d in range(err.dim()) if d != channel_dim]
            total = err.double().sum(dims)
            self.sums[n] = self.sums.get(n, 0) + total
            self.counts[n] = self.counts.get(n, 0) + err.numel() // err.shape[channel_dim]
        return result


def _mean_errors(float_gm: GraphModule, calibration_batches: Iterable,
                 deltas: dict[Node, torch.Tensor]) -> tuple[dict[Node, torch.Tensor], int, int]:
    """Per layer of ``deltas``: the mean over data and positions of ``op(x, delta)`` per output channel,
    ``x`` being the layer's input in the float graph; plus the numbers of batches and samples."""
    meter = _ErrorMeans(float_gm, deltas)
    batches = samples = 0
    with torch.no_grad():
        for batch in calibration_batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise InputError(f"calibration batch {batches} is a {type(x).__name__}, not a tensor")
            meter.run(x)
            batches += 1
            samples += int(x.shape[0]) if x.dim() else 1
    if batches == 0:
        raise InputError("bias correction needs at least one calibration batch")
    means = {node: meter.sums[node] / meter.counts[node] for node in meter.sums}
    return means, batches, samples


def _shift_bias(gm: GraphModule, layer: str, bias_target: str, shift: torch.Tensor) -> LayerBiasCorrection:
    """``bias −= shift`` (written as a new tensor: the old one may be shared with the user's model)."""
    old = _get(gm, bias_target).detach()
    _set(gm, bias_target, (old.double() - shift).to(old.dtype))
    return LayerBiasCorrection(
        layer=layer,
        mean_abs_shift=float(shift.abs().mean()),
        max_abs_shift=float(shift.abs().max()),
        mean_abs_bias=float(old.abs().mean()),
    )


def correct_bias(float_gm: GraphModule, calibration_batches: Iterable,
                 weight_quant_fn: WeightQuantFn = fake_quantize_weight, *,
                 per_channel: bool = False) -> BiasCorrectionReport:
    """Subtract each conv / linear layer's mean output error ``E[(W_q − W) x]`` from its bias, in place.

    ``calibration_batches``: input tensors (or ``(input, ...)`` tuples) for the float graph.
    ``weight_quant_fn(weight, per_channel)`` returns the fake-quantized weight the target will use
    (default :func:`fake_quantize_weight`; ``functools.partial(fake_quantize_weight, bits=4)`` for
    4-bit). The weights themselves are left in float: the quantizer quantizes them later. Layers
    without a bias get one.
    """
    deltas = {}
    for node in _layers(float_gm):
        w = _get(float_gm, str(node.args[1].target)).detach()
        deltas[node] = weight_quant_fn(w, per_channel).to(w.dtype) - w
    means, batches, samples = _mean_errors(float_gm, calibration_batches, deltas)
    report = []
    for node, shift in means.items():
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is None:
            w = _get(float_gm, str(node.args[1].target))
            bias = _add_bias(float_gm, node, torch.zeros(w.shape[0], dtype=w.dtype))
        report.append(_shift_bias(float_gm, layer_name(node), str(bias.target), shift))
    float_gm.recompile()
    return BiasCorrectionReport(tuple(report), batches, samples, per_channel)


def correct(prepared: GraphModule, float_gm: GraphModule, calibration_batches: Iterable) -> BiasCorrectionReport:
    """Bias correction inside the PTQ pipeline, between calibration and ``convert_pt2e``.

    ``prepared``: the graph after ``prepare_pt2e`` and calibration; ``float_gm``: a copy of the same graph
    taken before ``prepare_pt2e`` (same attribute names). Each layer's weight is fake-quantized with the
    parameters its own weight observer in ``prepared`` computed — exactly what ``convert_pt2e`` will use —
    and the correction, measured on ``float_gm``, is written to the bias of ``prepared`` (whose int32
    quantization happens at convert). Layers of ``prepared`` without a bias (or without a weight
    observer) are left alone.
    """
    by_weight = {str(n.args[1].target): n for n in _layers(float_gm)}
    targets: dict[Node, Node] = {}  # float layer -> prepared layer
    deltas = {}
    per_channel = False
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (CONV_OPS | _LINEAR_OPS) or len(node.args) < 2:
            continue
        obs_node = node.args[1]
        if not (isinstance(obs_node, Node) and obs_node.op == "call_module" and obs_node.args
                and isinstance(obs_node.args[0], Node) and obs_node.args[0].op == "get_attr"):
            continue
        float_node = by_weight.get(str(obs_node.args[0].target))
        bias = node.args[2] if len(node.args) > 2 else None
        if float_node is None or bias is None:
            continue
        obs = prepared.get_submodule(str(obs_node.target))
        w = _get(float_gm, str(obs_node.args[0].target)).detach()
        deltas[float_node] = _fake_quantize_with(obs, w) - w
        targets[float_node] = node
        per_channel = per_channel or obs.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    means, batches, samples = _mean_errors(float_gm, calibration_batches, deltas)
    report = []
    for float_node, shift in means.items():
        layer = targets[float_node]
        bias = layer.args[2]
        while isinstance(bias, Node) and bias.op == "call_module":  # the bias behind its observer
            bias = bias.args[0]
        if isinstance(bias, Node) and bias.op == "get_attr":
            report.append(_shift_bias(prepared, layer_name(layer), str(bias.target), shift))
    return BiasCorrectionReport(tuple(report), batches, samples, per_channel)


def _fake_quantize_with(obs: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized with the parameters ``obs`` computed, and back to float."""
    scale, zero_point = obs.calculate_qparams()
    if obs.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        axis = int(obs.ch_axis)
        block = tuple(1 if d == axis else n for d, n in enumerate(w.shape))
    else:
        block = tuple(w.shape)
    wf = w.float()
    q = quantize_affine(wf, block, scale, zero_point, torch.int8, obs.quant_min, obs.quant_max)
    return dequantize_affine(q, block, scale, zero_point, torch.int8, obs.quant_min, obs.quant_max).to(w.dtype)


def _set(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Point ``target`` at a new tensor (the old one may be shared with the user's model)."""
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def _add_bias(gm: GraphModule, node: Node, value: torch.Tensor) -> Node:
    stem = str(node.args[1].target).replace(".", "_") + "_bias"
    name, k = stem, 0
    while hasattr(gm, name):
        k += 1
        name = f"{stem}_{k}"
    gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(node):
        b_node = gm.graph.get_attr(name)
    w_val = node.args[1].meta.get("val")
    if isinstance(w_val, torch.Tensor) and hasattr(w_val, "fake_mode"):
        b_node.meta["val"] = w_val.fake_mode.from_tensor(value, static_shapes=True)
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    args[2] = b_node
    node.args = tuple(args)
    return b_node
