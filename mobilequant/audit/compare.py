"""The audit's core chain, one plain function per step (the shape of onnxruntime's ``qdq_loss_debug``):

1. :func:`match_layers` — fused float layers ↔ artifact tensors, through the export name map;
2. :func:`build_segments` — one runnable sub-model per layer, cut from the artifact, for isolation;
3. :func:`compare_batches` — per batch: float reference, the artifact's intermediates, each layer run
   alone on float inputs; errors accumulated into :class:`~mobilequant.audit.metrics.ErrorStats`;
4. :func:`layer_results` — metrics per layer (pluggable via ``metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .layers import FusedLayer
from ..export.layout import LayoutMismatch, to_file_layout, to_nchw
from .metrics import ErrorStats, Metric, compute_metrics
from .reference import FloatReference
from .report import LayerResult

__all__ = ["LayerMatch", "match_layers", "check_shapes", "build_segments", "BatchResults", "compare_batches", "layer_results"]


@dataclass(frozen=True)
class LayerMatch:
    index: int
    layer: FusedLayer
    tensor: str  # tensor name in the artifact


def match_layers(layers: list[FusedLayer], name_map: Mapping[str, str], graph,
                 inputs: Iterable[str] = (), output: tuple[str, str] | None = None,
                 ) -> tuple[list[LayerMatch], list[str], list[str]]:
    """Pair fused layers with the artifact's tensors.

    A name-map key may be any member of a fused group (conv, its BN or its activation); the key of the
    member closest to the group's output wins. Keys naming a graph input (``inputs``: the placeholders, e.g. ``x`` for the
    quantized input tensor) are known but are no layer. Returns ``(matches, unmapped layer names,
    unknown keys)``: unknown keys are names the float model does not have, or tensors the file does not
    have (``name → tensor`` shown). ``output``: (fx node name of the float graph's output, the
    artifact's output tensor) — the model output is the model output, whatever the names; it pairs the
    last layer with the file's output when the name map lacks it.
    """
    group_of = {m: l for l in layers for m in l.members}
    inputs = set(inputs)
    known_keys = [k for k in name_map if k in group_of]
    unknown = [k for k in name_map if k not in group_of and k not in inputs]
    unknown += [f"{k} → {name_map[k]}" for k in known_keys if not graph.has_tensor(name_map[k])]
    matched: dict[str, str] = {}
    used_tensors: set[str] = set()
    for layer in layers:
        if not layer.is_tensor:
            continue  # a multi-output op: its outputs are matched through their getitems
        # the group's output is its last member's: prefer the activation's key, then the BN's, then the conv's
        for m in reversed(layer.members):
            t = name_map.get(m)
            if t is not None and graph.has_tensor(t) and layer.name not in matched and t not in used_tensors:
                matched[layer.name] = t
                used_tensors.add(t)
    if output is not None and output[1] not in used_tensors and graph.has_tensor(output[1]):
        last = next((l for l in layers if l.output_node == output[0]), None)
        if last is not None and last.name not in matched:
            matched[last.name] = output[1]
    matches = [LayerMatch(i, l, matched[l.name]) for i, l in enumerate(layers) if l.name in matched]
    unmapped = [l.name for l in layers if l.name not in matched]
    return matches, unmapped, unknown


def check_shapes(matches: list[LayerMatch], graph) -> tuple[list[LayerMatch], list[str]]:
    """Drop matches whose artifact tensor cannot be the layer's output in any layout (static shapes).

    Returns the kept matches and one line per dropped layer. A name map that points one layer at the
    wrong tensor (e.g. the PAD in front of a pooling op) costs that layer, not the audit; when most
    layers misfit, the caller concludes that artifact and model do not belong together.
    """
    kept, dropped = [], []
    prefer = graph.target == "tflite"
    for m in matches:
        shape = graph.info(m.tensor).shape
        if shape and m.layer.out_shape:
            probe = np.zeros((1, *m.layer.out_shape[1:]), np.float32)
            try:
                to_file_layout(probe, shape, prefer)
            except LayoutMismatch:
                dropped.append(f"{m.layer.name}: the name map points at {m.tensor!r} of shape {tuple(shape)}, "
                               f"which cannot hold its output {tuple(m.layer.out_shape[1:])}; layer not compared")
                continue
        kept.append(m)
    return kept, dropped


def build_segments(graph, matches: list[LayerMatch], input_tensors: Iterable[str] = (),
                   progress=None) -> dict[str, object]:
    """Layer name → a sub-model of the artifact computing that layer from its nearest mapped inputs.

    ``input_tensors``: artifact tensors holding the model input (e.g. the quantized input), fed ``x``.
    ``progress``: a tqdm bar advanced once per layer.
    """
    boundary = [m.tensor for m in matches] + list(input_tensors)
    out = {}
    for m in matches:
        out[m.layer.name] = graph.segment(m.tensor, boundary)
        if progress is not None:
            progress.update(1)
    return out


@dataclass
class BatchResults:
    """Everything accumulated over the evaluation batches."""

    accumulated: dict[str, ErrorStats] = field(default_factory=dict)
    isolated: dict[str, ErrorStats] = field(default_factory=dict)
    float_channel_max: dict[str, np.ndarray] = field(default_factory=dict)
    quant_channel_max: dict[str, np.ndarray] = field(default_factory=dict)
    float_logits: list[np.ndarray] = field(default_factory=list)
    quant_logits: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def tick(self, key: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[key] = self.timings.get(key, 0.0) + t - t0
        return t


def _channel_max(a: np.ndarray) -> np.ndarray:
    """Max over every axis but the channel axis (1) of an NCHW / NC array."""
    if a.ndim < 2:
        return np.asarray([a.max()])
    return a.max(axis=tuple(i for i in range(a.ndim) if i != 1))


def _merge_max(store: dict, name: str, value: np.ndarray) -> None:
    store[name] = value if name not in store else np.maximum(store[name], value)


def compare_batches(graph, reference: FloatReference, matches: list[LayerMatch], segments: Mapping[str, object],
                    batches: Iterable[torch.Tensor], progress=None, input_tensors: Iterable[str] = ()) -> BatchResults:
    """Run float model, artifact and per-layer segments on each batch; accumulate the errors.

    A segment input that is a mapped layer's tensor gets that layer's float reference; one in
    ``input_tensors`` or a graph input gets the batch itself (in the tensor's layout).
    """
    input_tensors = set(input_tensors)
    res = BatchResults()
    tensor_layer = {m.tensor: m.layer.name for m in matches}
    prefer_nhwc = graph.target == "tflite"
    in_info = graph.input_info()
    for x in batches:
        t0 = time.perf_counter()
        f_out, f_vals = reference.run(x)
        t0 = res.tick("float_reference", t0)
        x_np = x.numpy()
        x_file = _file_layout(x_np, in_info.shape, False, "the model input")
        q_out, q_vals = graph.run(x_file, [m.tensor for m in matches])
        t0 = res.tick("artifact", t0)
        for name, v in f_vals.items():
            _merge_max(res.float_channel_max, name, _channel_max(v))
        res.float_logits.append(f_out.reshape(len(f_out), -1))
        res.quant_logits.append(q_out.reshape(len(q_out), -1))
        for m in matches:
            ref = f_vals[m.layer.name]
            try:
                q = to_nchw(q_vals[m.tensor], ref.shape, prefer_nhwc)
            except LayoutMismatch as e:
                raise InputError(f"layer {m.layer.name}: tensor {m.tensor!r}: {e} — do the artifact and the "
                                 "model belong together?") from None
            res.accumulated.setdefault(m.layer.name, ErrorStats()).update(ref, q)
            _merge_max(res.quant_channel_max, m.layer.name, _channel_max(q))
        t0 = res.tick("compare", t0)
        for m in matches:
            seg = segments.get(m.layer.name)
            if seg is None:
                continue
            feeds = {}
            for name in seg.inputs:
                if name in tensor_layer:
                    feeds[name] = _file_layout(f_vals[tensor_layer[name]], graph.info(name).shape, prefer_nhwc, name)
                elif name in input_tensors:  # the model input inside the graph (after a layout change)
                    feeds[name] = _file_layout(x_np, graph.info(name).shape, prefer_nhwc, name)
                else:  # a graph input
                    feeds[name] = x_file
            out = seg.run(feeds)
            ref = f_vals[m.layer.name]
            res.isolated.setdefault(m.layer.name, ErrorStats()).update(ref, to_nchw(out, ref.shape, prefer_nhwc))
        res.tick("isolated", t0)
        if progress is not None:
            progress.update(len(x))
    return res


def _file_layout(a: np.ndarray, shape, prefer_nhwc: bool, what: str) -> np.ndarray:
    if not shape:  # shape unknown to the file (ONNX without value_info): torch's own layout
        return a
    try:
        return to_file_layout(a, shape, prefer_nhwc)
    except LayoutMismatch as e:
        raise InputError(f"{what}: {e}") from None


def layer_results(matches: list[LayerMatch], res: BatchResults, segments: Mapping[str, object],
                  metrics: Mapping[str, Metric] | None = None) -> list[LayerResult]:
    out = []
    for m in matches:
        iso = res.isolated.get(m.layer.name)
        seg = segments.get(m.layer.name)
        out.append(LayerResult(
            index=m.index, name=m.layer.name, kind=m.layer.kind, tensor=m.tensor,
            accumulated=compute_metrics(res.accumulated[m.layer.name], metrics),
            isolated=None if iso is None else compute_metrics(iso, metrics),
            segment_ops=tuple(seg.op_names) if seg is not None else ()))
    return out
