"""Post-training quantization: the pipeline from a float model to a quantized graph and its table.

``quantize(model, calibration_batches, config)`` reads as the pipeline::

    capture → fold conv-BN → [cross-layer equalization] → check ops → prepare_pt2e → calibrate
            → [AdaRound] → [bias correction] → [range search] → repair degenerate ranges
            → convert_pt2e (simulated + for export) → table

Calibration data is an iterable of float NCHW batches (or ``(images, labels)`` pairs) already
normalised like the model's input. At most ``config.num_calibration`` images are used. A batch with NaN
or Inf values, a wrong shape, or an empty set raises :class:`InputError`.

Optional steps are modules of this package, called by contract:

* ``QuantConfig.cle``: ``mobilequant.quant.cle.equalize(gm) -> (gm, EqualizationReport)`` on the
  BN-folded float graph, before the quantizer sees it (the report is ``QuantResult.cle``);
* ``QuantConfig.bias_correction``: ``mobilequant.quant.bias_correction.correct(prepared, batches)``
  after calibration, with the calibrated prepared graph (its weight observers give the quantized
  weights, its activation observers the ranges) and the calibration batches actually used; it rewrites
  the conv / linear bias constants of ``prepared`` in place, before the int32 bias parameters are
  derived at conversion;
* ``QuantConfig.adaround``: ``mobilequant.quant.adaround.adaround(prepared, batches, options,
  bias_correction=...)`` rewrites the weights of ``prepared`` (and corrects the biases in the same walk);
* ``QuantConfig.range_search``: ``mobilequant.quant.range_search.search_ranges(prepared, batches)``, last,
  on the model with its final weights and biases; it pins narrower activation parameters on observers.

Degenerate ranges never reach the graph as a zero or NaN scale: an all-zero (dead) weight channel gets
the layer's median channel scale, an all-zero activation gets scale 1/255 (the [0, 1] range), and a
weight scale is raised where the int32 bias (scale = input × weight scale) would otherwise overflow.
Each repair is a :class:`Finding` on the result.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import FixedQParamsObserver, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from ..capture import MQ_NAME, capture, find_unsupported_ops, keeps_caller_state, layer_name
from ..errors import InputError, UsageError
from ..fusion import FusionReport, fold_conv_bn
from .config import QuantConfig
from .observers import pin_qparams
from .quantizer import FUSED_INTO, INT32_MAX, OP_RULES, MobileQuantizer, Rule, snap_leaky_slopes
from .table import QuantTable

__all__ = ["Finding", "QuantResult", "quantize", "calibrate", "repair_degenerate_ranges"]

DEGENERATE_ACT_SCALE = 1.0 / 255.0
_BIAS_HEADROOM = 0.5  # keep |bias| / (input scale × weight scale) under half the int32 range


@dataclass(frozen=True)
class Finding:
    """Something the pipeline changed or could not do, reported rather than hidden."""

    kind: str  # dead_weight_channels | bias_range | degenerate_activation | constant_activation
    #            | unobserved_activation | bn_not_folded | float_fallback | constant_channels
    #            | dead_channels_silenced (QAT)
    layer: str
    message: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.message}"


@dataclass
class QuantResult:
    """What :func:`quantize` produces.

    * ``graph`` runs the simulated int8 model in torch (``convert_pt2e(fold_quantize=True)``);
    * ``qdq_graph`` is the same model with explicit quantize/dequantize ops (``fold_quantize=False``),
      int32 bias included: the complete QDQ form (what an ONNX QDQ exporter needs, and what ``table``
      is read from);
    * ``export_graph`` is ``qdq_graph`` with each bias quantize/dequantize pair folded into a float
      constant that already lies on the int32 grid (value = dequantize(quantize(bias))). litert-torch
      cannot lower an int32 quantize op, and the TFLite converter quantizes float biases itself with
      the same rule (scale = input scale × weight scale), so it recovers exactly these integers.
      ``litert_torch.convert(export_graph, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer))``
      lowers it to a fully int8 TFLite model;
    * ``table`` lists every quantized tensor; ``findings`` what was repaired or left in float.
    """

    graph: GraphModule
    export_graph: GraphModule
    qdq_graph: GraphModule
    table: QuantTable
    config: QuantConfig
    quantizer: MobileQuantizer
    findings: list[Finding]
    float_model: nn.Module
    fusion: FusionReport = field(default_factory=FusionReport)
    example_input: torch.Tensor | None = None
    num_calibration_samples: int = 0
    cle: object | None = None  # mobilequant.quant.cle.EqualizationReport when QuantConfig.cle
    bias_correction: object | None = None  # ...bias_correction.BiasCorrectionReport when configured
    adaround: object | None = None  # mobilequant.quant.adaround.AdaRoundReport when QuantConfig.adaround
    range_search: object | None = None  # ...range_search.RangeSearchReport when QuantConfig.range_search
    fine_tuned: str | None = None  # "qat": the weights were trained after capture (float_model is the trained model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.graph(x)


# ---------------------------------------------------------------------------------------------------
# Calibration data


def _as_tensor(batch, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"calibration batch {index} is a {type(batch).__name__}, expected a tensor")
    return batch


def _checked(batches: Iterable, expected: torch.Size | None) -> Iterator[torch.Tensor]:
    """Yield tensors, refusing wrong shapes and non-finite values by batch index."""
    for i, batch in enumerate(batches):
        x = _as_tensor(batch, i)
        if expected is not None and (x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected)):
            raise InputError(
                f"calibration batch {i} has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, expected))})"
            )
        if not torch.is_floating_point(x):
            raise InputError(f"calibration batch {i} has dtype {x.dtype}; expected a float tensor")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"calibration batch {i} contains NaN or Inf values")
        yield x


def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor], limit: int,
              keep: list[torch.Tensor] | None = None) -> int:
    """Run at most ``limit`` images through the observers; return how many were used.

    ``keep``: if given, receives the tensors actually fed (the last one trimmed to the limit).
    """
    seen = 0
    with torch.no_grad():
        for i, x in enumerate(batches):
            x = x[: limit - seen]
            try:
                prepared(x)
            except ValueError as e:  # observers refuse NaN / Inf produced inside the model
                if "NaN" not in str(e) and "Inf" not in str(e):
                    raise
                raise InputError(f"calibration batch {i}: the model produces non-finite values ({e})") from None
            if keep is not None:
                keep.append(x)
            seen += x.shape[0]
            if seen >= limit:
                break
    return seen


# ---------------------------------------------------------------------------------------------------
# Pipeline


def _optional_module(name: str, option: str):
    full = f"mobilequant.quant.{name}"
    if importlib.util.find_spec(full) is None:
        raise UsageError(f"QuantConfig.{option}=True needs {full}, which is not installed")
    return importlib.import_module(full)


@keeps_caller_state
def quantize(
    model: nn.Module,
    calibration_batches: Iterable,
    config: QuantConfig | None = None,
    example_input: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize ``model`` (put in eval mode) to the TFLite int8 scheme, calibrated on the batches.

    ``model`` may also be a graph from :func:`mobilequant.capture.capture` (capture is then the
    caller's; the graph is copied, never modified).
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise UsageError(f"config must be a QuantConfig, got {type(config).__name__}")
    raw = iter(calibration_batches)
    try:
        first = _as_tensor(next(raw), 0)
    except StopIteration:
        raise InputError("calibration set is empty: at least one batch of images is needed") from None
    if example_input is None:
        example_input = first[:1]
    expected = example_input.shape[1:]
    batches = _checked(itertools.chain([first], raw), expected)

    gm = copy.deepcopy(model) if is_captured(model) else capture(model, example_input)
    fusion = fold_conv_bn(gm)
    findings = fusion_findings(fusion)

    cle_report = None
    if config.cle:
        gm, cle_report = _optional_module("cle", "cle").equalize(gm)

    quantizer = MobileQuantizer(config)
    quantizer.validate(gm)  # every unsupported op listed before any work
    findings += [
        Finding("float_fallback", name, f"{op} has no int8 rule; kept in float")
        for name, op in find_unsupported_ops(gm, quantizer.supported_ops())
    ]
    prepared = prepare_pt2e(gm, quantizer)

    kept: list[torch.Tensor] | None = [] if (config.bias_correction or config.adaround
                                             or config.range_search) else None
    n = calibrate(prepared, batches, config.num_calibration, keep=kept)
    if n == 0:
        raise InputError("calibration set is empty: the batches hold no images")

    snap_leaky_slopes(prepared)  # before the walks below, so they simulate the slopes the kernels compute
    bc_report = ada_report = None
    if config.adaround:  # rounds the weights, then corrects the biases in the same walk
        ada = _optional_module("adaround", "adaround")
        ada_report = ada.adaround(prepared, kept, ada.AdaRoundOptions(iterations=config.adaround_iterations),
                                  bias_correction=config.bias_correction)
        bc_report = ada_report.bias_correction
    elif config.bias_correction:
        bc_report = _optional_module("bias_correction", "bias_correction").correct(prepared, kept)
    range_report = None
    if config.range_search:  # last: it judges the ranges on the model as it will be (weights, biases final)
        range_report = _optional_module("range_search", "range_search").search_ranges(prepared, kept)

    findings += repair_degenerate_ranges(prepared, config)
    snap_leaky_slopes(prepared)  # again: the range search and the repairs may have moved input ranges
    qdq_graph = convert_pt2e(copy.deepcopy(prepared), fold_quantize=False)
    export_graph = fold_bias_qdq(copy.deepcopy(qdq_graph))
    graph = convert_pt2e(prepared, fold_quantize=True)
    return QuantResult(
        graph=graph,
        export_graph=export_graph,
        qdq_graph=qdq_graph,
        table=QuantTable.from_graph(qdq_graph),
        config=config,
        quantizer=quantizer,
        findings=findings,
        float_model=model,
        fusion=fusion,
        example_input=example_input,
        num_calibration_samples=n,
        cle=cle_report,
        bias_correction=bc_report,
        adaround=ada_report,
        range_search=range_report,
    )


def fusion_findings(fusion) -> list[Finding]:
    """What conv-BN folding reports: BNs left in float, and channels with zero BN variance folded to β."""
    return ([Finding("bn_not_folded", bn, f"batch norm kept in float: {why}") for bn, why in fusion.skipped]
            + [Finding("constant_channels", f.conv,
                       f"{len(f.constant_channels)} channel(s) with zero BN running variance folded to their "
                       f"constant output β (BN {f.bn}; channels {list(f.constant_channels)[:8]})")
               for f in fusion.folded if f.constant_channels])


def fold_bias_qdq(gm: GraphModule) -> GraphModule:
    """Replace every int32 ``dequantize(quantize(bias))`` by its float value (a new constant), in place."""
    graph = gm.graph
    for dq in list(graph.nodes):
        if dq.op != "call_function" or dq.target not in _DEQUANTIZE_OPS or _qdtype(dq) != torch.int32:
            continue
        q = dq.args[0]
        if not (isinstance(q, Node) and q.target in _QUANTIZE_OPS and q.args[0].op == "get_attr"):
            continue
        target = f"{q.args[0].target}_int32grid".replace(".", "_")
        if not hasattr(gm, target):  # one constant even when the bias has several dequantize copies
            gm.register_parameter(target, torch.nn.Parameter(_evaluate(gm, dq), requires_grad=False))
        with graph.inserting_before(dq):
            const = graph.get_attr(target)
        if "val" in dq.meta:
            const.meta["val"] = dq.meta["val"]
        dq.replace_all_uses_with(const)
        graph.erase_node(dq)
        if not q.users:
            graph.erase_node(q)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


_qd = torch.ops.quantized_decomposed
_QUANTIZE_OPS = {_qd.quantize_per_tensor.default, _qd.quantize_per_channel.default}
_DEQUANTIZE_OPS = {_qd.dequantize_per_tensor.default, _qd.dequantize_per_channel.default}


def _qdtype(node: Node):
    return next((a for a in node.args if isinstance(a, torch.dtype)), None)


def _evaluate(gm: GraphModule, node: Node) -> torch.Tensor:
    """Eagerly compute a node whose inputs are constants (get_attr / literals)."""

    def value(a):
        if isinstance(a, Node):
            if a.op == "get_attr":
                obj = gm
                for part in str(a.target).split("."):
                    obj = getattr(obj, part)
                return obj
            return _evaluate(gm, a)
        return a

    with torch.no_grad():
        return node.target(*[value(a) for a in node.args], **{k: value(v) for k, v in node.kwargs.items()}).detach()


def is_captured(model) -> bool:
    """A graph module that :func:`mobilequant.capture.capture` produced (its ops carry layer names)."""
    return isinstance(model, GraphModule) and any(MQ_NAME in n.meta for n in model.graph.nodes)


# ---------------------------------------------------------------------------------------------------
# Degenerate ranges


def _observer(gm: GraphModule, node) -> nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, ObserverBase):
            return mod
    return None


def _const(gm: GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, Node) and node.op == "call_module":
        node = node.args[0]
    if isinstance(node, Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj.detach()
    return None


def _tensor_layer(node: Node) -> str:
    src = node.args[0] if node.args else node
    if isinstance(src, Node):
        return src.meta.get(FUSED_INTO) or layer_name(src)
    return layer_name(node)


def repair_degenerate_ranges(prepared: GraphModule, config: QuantConfig) -> list[Finding]:
    """Give every degenerate range a small positive scale and report it (see module docstring)."""
    findings: list[Finding] = []
    weighted = [n for n in prepared.graph.nodes if n.op == "call_function" and OP_RULES.get(n.target) is Rule.WEIGHTED]
    weight_obs = {id(_observer(prepared, n.args[1])) for n in weighted}

    done: set[int] = set()
    for node in prepared.graph.nodes:  # activations first: bias bounds below use the input scale
        obs = _observer(prepared, node)
        if obs is None or id(obs) in done or id(obs) in weight_obs:
            continue
        done.add(id(obs))
        if isinstance(obs, FixedQParamsObserver) or not hasattr(obs, "quant_min") or obs.dtype != torch.int8:
            continue  # fixed parameters, or derived (bias) observers
        f = _repair_activation(obs, _tensor_layer(node))
        if f:
            findings.append(f)

    for node in weighted:
        obs = _observer(prepared, node.args[1])
        w = _const(prepared, node.args[1])
        if obs is None or w is None:
            continue
        in_obs = _observer(prepared, node.args[0])
        bias = _const(prepared, node.args[2]) if len(node.args) > 2 else None
        findings += _repair_weight(obs, w, in_obs, bias, layer_name(node), config)
    return findings


def _repair_activation(obs: nn.Module, layer: str) -> Finding | None:
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    known = isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) and lo.numel() == 1
    if known and not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        pin_qparams(obs, torch.tensor([DEGENERATE_ACT_SCALE]), torch.tensor([obs.quant_min]))
        return Finding("unobserved_activation", layer, "no calibration data reached this tensor; scale set to 1/255")
    scale, zp = obs.calculate_qparams()
    scale = scale.reshape(-1)
    # Empty: the range, which always includes 0, has no width (all values 0). A tiny but non-empty range
    # keeps the observer's scale (torchao clamps it at float32 eps): it is what the data say.
    empty = known and float(torch.clamp(hi, min=0) - torch.clamp(lo, max=0)) == 0.0
    broken = not bool(torch.isfinite(scale).all()) or float(scale.min()) <= 0.0
    if empty or broken:
        pin_qparams(obs, torch.tensor([DEGENERATE_ACT_SCALE]), torch.tensor([obs.quant_min]))
        return Finding("degenerate_activation", layer, "activation is all zero on the calibration set; "
                       "scale set to 1/255")
    if (known and float(lo) == float(hi)) or (not known and getattr(obs, "degenerate", False)):
        value = f" {float(lo):g}" if known else ""
        return Finding("constant_activation", layer, f"activation is constant{value} on the calibration set")
    return None


def _repair_weight(obs, w, in_obs, bias, layer: str, config: QuantConfig) -> list[Finding]:
    """Dead channels get the median channel scale; any channel whose int32 bias would overflow (bias /
    (input scale × weight scale) beyond half the int32 range) gets a weight scale large enough."""
    scale, zp = obs.calculate_qparams()
    scale = scale.reshape(-1).to(torch.float32).clone()
    if config.per_channel:
        dead = w.reshape(w.shape[0], -1).abs().amax(dim=1) == 0
    else:
        dead = (w.abs().max() == 0).reshape(1)
    dead = dead | ~torch.isfinite(scale) | (scale <= 0)
    healthy = scale[~dead]
    base = float(healthy.median()) if healthy.numel() else 1.0 / config.weight_qmax
    new = torch.where(dead, torch.full_like(scale, base), scale)
    need = torch.zeros_like(scale)
    if bias is not None and in_obs is not None:
        in_scale = float(in_obs.calculate_qparams()[0].reshape(-1)[0])
        need = bias.abs().reshape(-1).to(torch.float32) / (in_scale * INT32_MAX * _BIAS_HEADROOM)
        need = need if need.numel() == scale.numel() else need.max().reshape(1).expand_as(scale)
    raised = need > new
    new = torch.maximum(new, need)
    if not bool(dead.any() or raised.any()):
        return []
    pin_qparams(obs, new, torch.zeros_like(zp))
    findings = []
    if bool(dead.any()):
        channels = dead.nonzero().reshape(-1).tolist()
        what = f"channel(s) {channels[:8]}{'...' if len(channels) > 8 else ''}" if config.per_channel else "tensor"
        findings.append(Finding("dead_weight_channels", layer,
                                f"all-zero weight {what}; scale set to {float(new[dead][0]):.3g} "
                                "(median channel scale)"))
    live_raised = raised & ~dead
    if bool(live_raised.any()):
        channels = live_raised.nonzero().reshape(-1).tolist()
        findings.append(Finding("bias_range", layer,
                                f"weight scale of channel(s) {channels[:8]} raised so the int32 bias fits "
                                f"(input scale {in_scale:.3g})"))
    return findings
