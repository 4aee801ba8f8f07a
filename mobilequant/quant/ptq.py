"""Post-training quantization: the pipeline from a float model to a quantized graph and its table.

``quantize(model, calibration_batches, config)`` reads as the pipeline::

    capture → fold conv-BN → [cross-layer equalization] → check ops → prepare_pt2e → calibrate
            → [AdaRound] → [bias correction] → [range search] → repair degenerate ranges
            → convert_pt2e (simulated + for export) → table

Calibration data are float NCHW images already normalised like the model's input, in any form
:func:`image_batches` reads: batches (a list, a generator, a DataLoader; tensors, float arrays, ``(images,)``
or ``(images, labels)``), one N×C×H×W tensor or float array, an ``(images, labels)`` pair, or an
``ImageData``. At most ``config.num_calibration`` images are used. A batch with NaN or Inf values, a wrong
shape or dtype (uint8 pixels; float64 is converted to float32), no images, or an empty set raises
:class:`InputError` with one line naming it.

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
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
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
from .quantizer import FUSED_INTO, INT32_MAX, OP_RULES, MobileQuantizer, Rule, snap_to_kernels
from .table import QuantTable

__all__ = ["Finding", "QuantResult", "quantize", "calibrate", "image_batches", "repair_degenerate_ranges"]

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

    def __repr__(self) -> str:
        """One line of key figures (the dataclass repr printed every graph: ~100k characters)."""
        return f"{type(self).__name__}({', '.join(self._repr_figures())})"

    def _repr_figures(self) -> list[str]:
        name = getattr(self.float_model, "model_name", None) or type(self.float_model).__name__
        weights = "per-channel" if self.config.per_channel else "per-tensor"
        figures = [repr(name), f"{len(self.table)} quantized tensors",
                   f"{weights} {self.config.weight_bits}-bit weights",
                   f"calibration {self.config.calibration} on {self.num_calibration_samples} images"]
        figures += [f"{len(self.findings)} finding(s)"] if self.findings else []
        return figures


# ---------------------------------------------------------------------------------------------------
# Calibration data


CHUNK = 64  # images per batch when one tensor or array holds the whole set


def image_batches(data, what: str = "calibration", expected: tuple[int, ...] | None = None,
                  expected_from: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images, labels or None)`` batches, images float32 ``N×C×H×W``, from every form image data take:

    * an :class:`~mobilequant.data.ImageData` (what :func:`mobilequant.data.load_data` returns);
    * one ``N×C×H×W`` tensor or float array: the whole set, read ``CHUNK`` images at a time;
    * an ``(images, labels)`` pair of those (labels: one integer per image);
    * an iterable of batches (a list, a generator, a ``DataLoader``), each a tensor, a float array, or an
      ``(images,)`` / ``(images, labels)`` tuple or list (a second item that is not one class index per
      image — a mask, a regression target — is not read as labels).

    Each batch is checked as it is read, and refused with an :class:`InputError` naming ``what`` and the
    batch (or image) index: not ``N×C×H×W`` with ``N ≥ 1``, not float (uint8 raw pixels are refused;
    float64 and float16 are converted to float32), NaN or Inf values, or another image shape than
    ``expected`` (default: the first batch's; ``expected_from`` says where it comes from).
    """
    from ..data.readers import ImageData

    whole_name = what if what.endswith("data") else f"{what} data"
    if isinstance(data, ImageData):
        data = (data.images, data.labels)
    if isinstance(data, (str, bytes, os.PathLike)):
        raise InputError(f"{whole_name} is {_a(type(data).__name__)} ({str(data)[:80]!r}); expected images "
                         "(read files with mobilequant.data.load_data)")
    whole = _image_set(data)
    if whole is not None:  # one set: checked whole, then read a chunk at a time
        x, y = whole
        x = _float_images(x, whole_name)
        _check_images(x, whole_name, expected, expected_from, "image")
        if y is not None:
            y = _labels(y, len(x), whole_name)
        for start in range(0, len(x), CHUNK):
            yield x[start:start + CHUNK], None if y is None else y[start:start + CHUNK]
        return
    try:
        batches = iter(data)
    except TypeError:
        raise InputError(f"{whole_name} is {_a(type(data).__name__)}; expected images: an N×C×H×W tensor or "
                         "float array, an (images, labels) pair, an ImageData, or batches of those") from None
    for i, batch in enumerate(batches):
        name = f"{what} batch {i}"
        labels = None
        if isinstance(batch, (tuple, list)) and batch:
            batch, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        x = _float_images(batch, name)
        expected = _check_images(x, name, expected, expected_from or "the shape of batch 0")
        yield x, None if labels is None else _labels(labels, len(x), name, strict=False)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in tuple('aeioAEIO') else 'a'} {noun}"


def _image_set(data) -> tuple | None:
    """``(images, labels or None)`` when ``data`` is one set of images (a 4-D tensor or array, or an
    ``(images, labels)`` pair of one with 1-D labels); ``None`` when it is something to iterate."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data, None
    if (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray))
            and data[0].ndim == 4 and (data[1] is None or (isinstance(data[1], (torch.Tensor, np.ndarray, list))
                                                           and np.ndim(data[1]) == 1))):
        return data
    return None


def _float_images(x, name: str) -> torch.Tensor:
    """``x`` as a float32 tensor: an array is converted, float64 / float16 cast; anything else refused."""
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                                     or x.dtype == bool):
            raise InputError(f"{name} is an array of {x.dtype}; expected float32 images")
        kind = _a(f"{x.dtype} array")
        x = torch.from_numpy(np.ascontiguousarray(x)) if np.issubdtype(x.dtype, np.floating) else x
    elif isinstance(x, torch.Tensor):
        kind = _a(f"{str(x.dtype).removeprefix('torch.')} tensor")
    else:
        raise InputError(f"{name} is {_a(type(x).__name__)}; expected a tensor of images (N×C×H×W)")
    if not (isinstance(x, torch.Tensor) and torch.is_floating_point(x)):
        raise InputError(f"{name} is {kind}; expected float images normalised like the model's input (raw "
                         "uint8 pixels go through mobilequant.data.preprocess_images first)")
    return x if x.dtype == torch.float32 else x.float()


def _check_images(x: torch.Tensor, name: str, expected, expected_from: str, image: str = "its image"):
    """Refuse a batch that is not ``N×C×H×W`` (N ≥ 1) of the ``expected`` image shape, or holds NaN / Inf;
    return the image shape later batches must have."""
    shape = tuple(x.shape)
    if x.dim() != 4 or (expected is not None and shape[1:] != tuple(expected)):
        want = "(N, C, H, W)" if expected is None else f"(N, {', '.join(map(str, expected))})"
        source = f" ({expected_from})" if expected is not None and expected_from else ""
        hint = f"; {CHANNELS_LAST}" if looks_channels_last(shape[1:], expected) else ""
        raise InputError(f"{name} has shape {shape}; expected {want}{source}{hint}")
    if not shape[0]:
        raise InputError(f"{name} holds no images (shape {shape})")
    from ..data.readers import nonfinite_images

    bad, shown = nonfinite_images(x)
    if bad:
        raise InputError(f"{name} contains NaN or Inf values ({image} {shown}; {len(bad)} of {shape[0]} images)")
    return shape[1:]


def looks_channels_last(image: tuple[int, ...], expected: tuple[int, ...] | None = None) -> bool:
    """Is ``image`` (one image's shape) H×W×C: ``expected`` (C×H×W) transposed, or without ``expected`` a
    last dimension that looks like channels (1, 3, 4) and a first that does not?"""
    if len(image) != 3:
        return False
    if expected is not None:
        return len(expected) == 3 and tuple(image) == (expected[1], expected[2], expected[0]) != tuple(expected)
    return image[2] in (1, 3, 4) and image[0] not in (1, 3, 4)


def channels_last_error(error: InputError, source: str, image: tuple[int, ...]) -> InputError | None:
    """The capture failure ``error`` said again as what it most likely is, when the images it was taken
    from (``source``, one image's shape ``image``) look channels-last; ``None`` otherwise."""
    if not looks_channels_last(image):
        return None
    return InputError(f"{source} images of shape {image}: {CHANNELS_LAST} ({error})")


def model_input_size(model, example_input=None) -> tuple[tuple[int, ...] | None, str]:
    """The image shape data must have, and where it comes from: ``example_input``'s, else the model's own
    (``model.preprocess.input_size``, what the zoo and the shipped models carry), else ``(None, "")`` —
    the first batch's then. A 28×28 set for the 32×32 default model had been calibrated and exported
    as a 28×28 file without a word."""
    if example_input is not None:
        return tuple(example_input.shape[1:]), "the shape of example_input"
    size = getattr(getattr(model, "preprocess", None), "input_size", None)
    if size is not None and not is_captured(model):
        return (tuple(int(v) for v in size),
                "the model's input size, model.preprocess.input_size; for another size give example_input")
    return None, ""


CHANNELS_LAST = ("it looks channels-last (H×W×C); the model takes C×H×W: transpose it (tensor.permute(0, 3, 1, 2), "
                 "array.transpose(0, 3, 1, 2))")


def _labels(y, n: int, name: str, strict: bool = True) -> torch.Tensor | None:
    """Integer class labels, one per image. ``strict``: anything else is refused (an ``(images, labels)``
    pair says they are labels); otherwise it is not read as labels (``None``: a batch's second item may be
    a segmentation mask or a regression target, which calibration never reads)."""
    try:
        y = torch.as_tensor(np.asarray(y) if isinstance(y, list) else y)
    except (TypeError, ValueError, RuntimeError):
        y = None
    shape = None if y is None else tuple(y.shape)
    if shape != (n,):
        if not strict:
            return None
        raise InputError(f"{name} has {n} images but labels of shape {shape}; expected ({n},): one class "
                         "index per image")
    whole = (bool((y == y.round()).all()) if torch.is_floating_point(y)
             else y.dtype != torch.bool and not torch.is_complex(y))
    if not whole:
        if not strict:
            return None
        raise InputError(f"{name} has labels of {y.dtype} that are not whole numbers; expected class indices")
    return y.to(torch.int64)


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
    given, given_from = model_input_size(model, example_input)
    raw = image_batches(calibration_batches, "calibration", given, given_from)
    first = next(raw, None)
    if first is None:
        raise InputError("calibration set is empty: at least one batch of images is needed")
    if example_input is None:
        example_input = first[0][:1]
    batches = itertools.chain([first[0]], (x for x, _ in raw))

    try:
        gm = copy.deepcopy(model) if is_captured(model) else capture(model, example_input)
    except InputError as e:
        hint = None if given is not None else channels_last_error(e, "calibration", tuple(first[0].shape[1:]))
        if hint is None:
            raise
        raise hint from e.__cause__
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

    snap_to_kernels(prepared)  # before the walks below, so they simulate what the kernels compute
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
    findings += kernel_findings(snap_to_kernels(prepared))  # again: the range search and repairs move ranges
    qdq_graph = convert_pt2e(copy.deepcopy(prepared), fold_quantize=False)
    export_graph = snap_weights_to_grid(fold_bias_qdq(copy.deepcopy(qdq_graph)))
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


def snap_weights_to_grid(gm: GraphModule) -> GraphModule:
    """Replace every float weight that an int8 quantize op reads by ``dequantize(quantize(w))``, in place.

    The simulation's codes are torch's ``round(w · (1/s))`` in float32; the TFLite converter quantizes the
    float weight of ``export_graph`` again with its own arithmetic (more precise than float32), so a weight
    within ~1e-8 of a rounding tie got the other code (SqueezeNext-23: 2 of 572,736 weights, each shifting a
    whole output channel). A weight already on the grid rounds to the same code under any arithmetic."""
    for q in list(gm.graph.nodes):
        if (q.op != "call_function" or q.target not in _QUANTIZE_OPS or _qdtype(q) != torch.int8
                or not isinstance(q.args[0], Node) or q.args[0].op != "get_attr"):
            continue
        dq = next((u for u in q.users if u.target in _DEQUANTIZE_OPS), None)
        if dq is None:
            continue
        obj = gm
        *path, last = str(q.args[0].target).split(".")
        for part in path:
            obj = getattr(obj, part)
        w = getattr(obj, last)
        grid = _evaluate(gm, dq).to(w.dtype)
        if isinstance(w, nn.Parameter):
            with torch.no_grad():
                w.copy_(grid)
        else:
            setattr(obj, last, grid)
    gm.recompile()
    return gm


def kernel_findings(unsnapped: list[tuple[str, str]]) -> list[Finding]:
    """Findings for the layers :func:`~mobilequant.quant.quantizer.snap_to_kernels` could not make exact
    (the TFLite kernel computes another code than the simulation for some inputs)."""
    return [Finding("kernel_not_exact", layer, message) for layer, message in unsnapped]


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
    dead_rows = w.reshape(w.shape[0], -1).abs().amax(dim=1) == 0 if w.numel() else torch.zeros(0, dtype=torch.bool)
    dead = dead_rows if config.per_channel else (w.abs().max() == 0).reshape(1)
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
    findings = []
    if not config.per_channel and not bool(dead.any()) and bool(dead_rows.any()):
        # Per-tensor: the tensor's scale covers the dead rows too (nothing to repair), but the channels
        # are as dead as in per-channel mode and reported the same way.
        channels = dead_rows.nonzero().reshape(-1).tolist()
        findings.append(Finding("dead_weight_channels", layer,
                                f"all-zero weight channel(s) {channels[:8]}{'...' if len(channels) > 8 else ''}"
                                f"; per-tensor scale {float(new[0]):.3g} (the tensor's)"))
    if not bool(dead.any() or raised.any()):
        return findings
    pin_qparams(obs, new, torch.zeros_like(zp))
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
