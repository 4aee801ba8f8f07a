"""Name maps: stable layer name (``node.meta["mq_name"]``) → name of the tensor in the exported file.

TFLite: litert-torch names each tensor after the MLIR location of the op that made it, which is the
node's module hierarchy (``Class_attr/Class_attr/...;``, several joined by ``;`` when the converter fused
ops). :func:`tflite_name_map` computes the same hierarchy for every quantized (or, in float graphs,
every compute) node of the lowered graph and matches it against the tensor names' components; a
quantized tensor must also carry exactly that node's scale and zero point. The value for a fused
``conv → ReLU6`` is the fused op's output tensor, keyed by the conv's name (like the quant table).

ONNX: the dynamo exporter records the FX node name of each ONNX node
(``pkg.torch.onnx.name_scopes``); FX names trace back (``meta["from_node"]``) to the lowered graph's nodes
and their ``mq_name``. int8 layers map to their output ``QuantizeLinear``'s output.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401 (registers the q/dq ops)
from torch.fx import GraphModule, Node

from ..capture import layer_name
from .layout import fits
from .rewrites import INTERNAL_KEY
from .tflite_file import WEIGHTED_OPS

__all__ = ["tflite_name_map", "tflite_tensor_names", "onnx_name_map", "quantize_sites", "QuantSite",
           "INTERNAL_KEY"]

_qd = torch.ops.quantized_decomposed
_QUANTIZE = (_qd.quantize_per_tensor.default, _qd.quantize_per_tensor.tensor)
_STRUCTURAL = ("getitem", "sym_size", "_assert", "guards")
_aten = torch.ops.aten
_WEIGHTED_TARGETS = frozenset({_aten.conv1d.default, _aten.conv2d.default, _aten.conv_transpose2d.input,
                               _aten.linear.default})
# The TFLite ops a float graph node becomes (the conv / linear ones: WEIGHTED_OPS).
_TFLITE_OPS = {**{t: WEIGHTED_OPS | {"BATCH_MATMUL"} for t in _WEIGHTED_TARGETS},
               _aten.add.Tensor: {"ADD"}, _aten.add_.Tensor: {"ADD"}, _aten.mul.Tensor: {"MUL"},
               _aten.cat.default: {"CONCATENATION"}}


class QuantSite:
    """A quantized activation tensor of the lowered graph: layer, params, module hierarchy."""

    __slots__ = ("layer", "scale", "zero_point", "segments", "internal", "node")

    def __init__(self, layer, scale, zero_point, segments, internal, node):
        self.layer, self.scale, self.zero_point = layer, scale, zero_point
        self.segments, self.internal, self.node = segments, internal, node


def _segments(node: Node) -> tuple[str, ...]:
    """litert-torch's location of ``node`` as path segments, root class first.

    Same format as ``litert_torch.backend.debuginfo.build_mlir_debuginfo`` (``Class_attr`` per module).
    """
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, layer in stack.values():
        iid = ("_" + path.split(".")[-1]) if path else ""
        cls = layer if isinstance(layer, str) else f"{layer.__module__}.{layer.__qualname__}"
        out.append(cls + iid)
    return tuple(out)


def _components(tensor_name: str) -> list[tuple[str, ...]]:
    return [tuple(c.split("/")) for c in tensor_name.split(";") if c]


def _located(tensor_comps: list[tuple[str, ...]], segments: tuple[str, ...], first_only: bool) -> bool:
    """Whether the tensor's location (first component, or any) is the node's module (suffix match)."""
    inner = segments[1:]  # the root class may differ (a wrapper module adds a level)
    for comp in (tensor_comps[:1] if first_only else tensor_comps):
        if inner and len(comp) >= len(inner) and comp[-len(inner):] == inner:
            return True
        if not inner and len(comp) <= 2:
            return True
    return False


def _same(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


def _const_value(gm: GraphModule, a) -> float:
    if isinstance(a, Node) and a.op == "get_attr":
        obj = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part)
        return float(obj.reshape(-1)[0])
    return float(a)


def quantize_sites(gm: GraphModule) -> list[QuantSite]:
    """Every activation quantize op of a ``convert_pt2e`` graph, in graph order."""
    sites = []
    for q in gm.graph.nodes:
        if q.op != "call_function" or q.target not in _QUANTIZE:
            continue
        src = q.args[0]
        if not isinstance(src, Node) or src.op == "get_attr":
            continue
        scale, zp = _const_value(gm, q.args[1]), int(_const_value(gm, q.args[2]))
        if src.op == "placeholder":
            layer = str(src.target)
        else:
            layer = src.meta.get("mq_fused_into") or (layer_name(src) if "mq_name" in src.meta else src.name)
        sites.append(QuantSite(layer, scale, zp, _segments(src), bool(src.meta.get(INTERNAL_KEY)), src))
    return sites


def tflite_name_map(gm: GraphModule, info, quantized: bool) -> tuple[dict[str, str], dict[int, str]]:
    """(name map, tensor index → layer) for a TFLite file lowered from ``gm``."""
    name_map: dict[str, str] = {}
    tensor_layer: dict[int, str] = {}
    # Graph outputs carry the signature's name, not a location: _map_graph_output places them.
    produced = [(op, t) for op in info.ops for t in op.outputs if t >= 0 and t not in info.outputs]
    producer = {t: op for op, t in produced}
    if quantized:
        sites = quantize_sites(gm)
        used: set[int] = set()

        def matches(t: int, site: QuantSite) -> bool:
            tensor = info.tensors[t]
            return (t not in used and tensor.quantized and len(tensor.scales) == 1
                    and _same(tensor.scales[0], site.scale) and tensor.zero_points[0] == site.zero_point
                    and _located(_components(tensor.name), site.segments, first_only=True))

        for site in sites:
            t = next((t for _, t in produced if matches(t, site)), None)
            if t is None:
                continue
            t = _past_pads(info, producer, t, lambda o: matches(o, site), used)
            if not site.internal:  # rewrite intermediates are checked by value, not as the layer
                tensor_layer[t] = site.layer
                name_map.setdefault(site.layer, info.tensors[t].name)
        _map_graph_output(gm, info, name_map, tensor_layer, quantized)
        return name_map, tensor_layer
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "mq_name" in n.meta
             and not n.meta.get(INTERNAL_KEY) and not any(s in n.name for s in _STRUCTURAL)]
    used = set()
    for node in nodes:
        segs = _segments(node)
        located = [t for _, t in produced if t not in used
                   and _located(_components(info.tensors[t].name), segs, first_only=True)]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            # A location is shared by every op the converter made from a node or moved into it; only a
            # tensor that can hold the node's value is its output (ShuffleNetV2's concat location also
            # names a 24-channel half; a shuffle's, its rank-5 middle).
            located = [t for t in located if fits(info.tensors[t].shape, tuple(val.shape))]
        if not located:
            continue
        # A location can also name a neighbour the converter moved into the node: at 1×1 spatial size
        # ShuffleNetV1's channel-shuffle RESHAPE carries its depthwise conv's location, ahead of the
        # DEPTHWISE_CONV_2D (the audit read −1.7 dB there), and IGCV3's unshuffle RESHAPE its block's
        # residual add. A node with an op of its own takes that op's tensor; a conv or linear whose op
        # carries another location (a fused activation's) is left to that layer.
        ops = _TFLITE_OPS.get(node.target)
        if ops is not None:
            own = [o for o in located if producer[o].name in ops]
            if not own and node.target in _WEIGHTED_TARGETS:
                continue
            located = own or located
        t = located[0]
        if node.target == _aten.hardsigmoid.default and producer[t].name in WEIGHTED_OPS:
            # relu6(x + 3) / 6 after a conv: the converter folds the + 3 into the conv's bias and the clip
            # into its fused RELU6 (which carries the h-sigmoid's location), then divides in a MUL; the
            # conv's tensor is 6 × h-sigmoid (the audit read −14 dB), the MUL's is the h-sigmoid.
            readers = [op for op in info.ops if t in op.inputs]
            if len(readers) == 1 and readers[0].name == "MUL" and readers[0].outputs[0] not in used:
                t = readers[0].outputs[0]
        # The op after a split-off PAD may carry a fused activation's location instead.
        t = _past_pads(info, producer, t, lambda o: o not in used, used)
        tensor_layer[t] = layer_name(node)
        name_map.setdefault(layer_name(node), info.tensors[t].name)
    _map_graph_output(gm, info, name_map, tensor_layer, quantized)
    return name_map, tensor_layer


def _past_pads(info, producer: dict, t: int, same_layer, used: set[int]) -> int:
    """``t``, or the op after it when ``t`` is a PAD the converter split off the layer (PAD → MAX_POOL_2D,
    PAD → DEPTHWISE_CONV_2D): the layer's output is the tensor the next layer reads."""
    used.add(t)
    while t in producer and producer[t].name in ("PAD", "PADV2"):
        nxt = next((o for op in info.ops if t in op.inputs for o in op.outputs if o >= 0 and same_layer(o)), None)
        if nxt is None:
            break
        t = nxt
        used.add(t)
    return t


def _map_graph_output(gm: GraphModule, info, name_map: dict[str, str], tensor_layer: dict[int, str],
                      quantized: bool) -> None:
    """The layer that makes the graph output: its tensor carries the signature's name, not a location."""
    if len(info.outputs) != 1:
        return
    out = info.outputs[0]
    if quantized and not info.tensors[out].quantized:  # float I/O: the int8 tensor before DEQUANTIZE
        producer = next((op for op in info.ops if out in op.outputs), None)
        if producer is None or producer.name != "DEQUANTIZE":
            return
        out = producer.inputs[0]
    if out in tensor_layer:
        return
    src = gm.graph.output_node().args[0]
    src = src[0] if isinstance(src, (tuple, list)) and len(src) == 1 else src
    # Back through the output's dequantize / quantize pair (quantized graphs) to the compute node.
    while isinstance(src, Node) and src.op == "call_function" and (
            src.target in _QUANTIZE or "dequantize" in str(src.target)):
        src = src.args[0]
    if not isinstance(src, Node) or src.op != "call_function" or "mq_name" not in src.meta:
        return
    layer = (src.meta.get("mq_fused_into") if quantized else None) or layer_name(src)
    if layer not in name_map:
        name_map[layer] = info.tensors[out].name
        tensor_layer[out] = layer


def tflite_tensor_names(info, tensor_layer: dict[int, str]) -> dict[int, str]:
    """Short, unique tensor names for a TFLite file: a mapped tensor takes its layer's stable name, a
    weight / bias ``<layer>/weight`` / ``<layer>/bias``, any other ``<op>_<index>``; graph inputs and
    outputs keep the signature's names.

    litert names tensors after the MLIR location of their op, the module class path of every enclosing
    module (``mobilequant.models.mobilenetv2.MobileNetV2/torch.nn.modules.container.Sequential_features/
    ...``): about 57 KB of names in MobileNetV2 0.5's 1 MB int8 file. The stable names say the same in a
    tenth of the space and make the name map trivial.
    """
    names: dict[int, str] = {}
    taken: set[str] = set()

    def put(index: int, name: str) -> None:
        base, k = name, 1
        while name in taken:
            name, k = f"{base}:{k}", k + 1
        names[index] = name
        taken.add(name)

    for index in (*info.inputs, *info.outputs):
        put(index, info.tensors[index].name)
    for index, layer in tensor_layer.items():
        if index not in names:
            put(index, layer)
    readers: dict[int, list] = {}
    for op in info.ops:
        for index in op.inputs:
            if index >= 0:
                readers.setdefault(index, []).append(op)
    for op in info.ops:
        layer = tensor_layer.get(op.outputs[0]) if op.outputs else None
        if layer is None and op.name in WEIGHTED_OPS:
            layer = _clamped_layer(info, readers, tensor_layer, op.outputs[0])
        for pos, index in enumerate(op.inputs):
            if index >= 0 and index not in names and info.tensors[index].constant:
                role = {1: "weight", 2: "bias"}.get(pos) if op.name in WEIGHTED_OPS and layer else None
                put(index, f"{layer}/{role}" if role else f"{op.name.lower()}_{index}")
        for index in op.outputs:
            if index >= 0 and index not in names:
                put(index, f"{op.name.lower()}_{index}")
    for t in info.tensors:
        if t.index not in names:
            put(t.index, f"t{t.index}")
    return names


def _clamped_layer(info, readers: dict[int, list], tensor_layer: dict[int, str], t: int) -> str | None:
    """The layer of a conv / linear whose output ``t`` feeds CLE's per-channel clamp: the clamp's tensor.

    CLE makes ``conv → ReLU6`` a ``conv → clamp`` with per-channel bounds; the converter fuses the lower
    bound into the conv (RELU) and writes the upper one as a MINIMUM with a constant ``[C]`` operand
    (MAXIMUM too for other bounds). The layer's output is the clamp's, so the conv's own tensor is no
    layer's; its weight and bias belong to the layer the clamp's output is mapped to.
    """
    for _ in range(2):  # MAXIMUM → MINIMUM at most
        if t in tensor_layer:
            return tensor_layer[t]
        ops = readers.get(t, [])
        if len(ops) != 1 or ops[0].name not in ("MINIMUM", "MAXIMUM") or not ops[0].outputs:
            return None
        bounds = [i for i in ops[0].inputs if i >= 0 and i != t]
        if len(bounds) != 1 or not info.tensors[bounds[0]].constant:
            return None
        t = ops[0].outputs[0]
    return tensor_layer.get(t)


def onnx_name_map(model, program, gm: GraphModule, quantized: bool) -> dict[str, str]:
    """Name map of an ONNX model exported (via ``program``, an ExportedProgram of ``gm``)."""
    originals = {n.name: n for n in gm.graph.nodes}
    by_fx: dict[str, Node] = {}
    for n in program.graph.nodes:
        if n.name in originals and not n.meta.get("from_node"):
            by_fx[n.name] = originals[n.name]
            continue
        chain, history = [(n.name, None)], n.meta.get("from_node") or []
        while history:  # the provenance chain of this node, newest first
            chain.append((getattr(history[0], "name", None), getattr(history[0], "graph_id", None)))
            history = getattr(history[0], "from_node", None) or []
        # The entry recorded in ``gm``'s own graph names the node; a name alone is not enough: torch.export
        # renumbers nodes when it traces ``gm``, and on ShuffleNetV1 the new ``relu__9`` is gm's
        # ``relu__11`` while gm has a ``relu__9`` of its own (each unit's conv1 was mapped to the next's).
        hit = next((name for name, gid in chain if gid == id(gm.graph) and name in originals), None)
        if hit is None:  # no graph ids in the provenance (another torch version): the nearest name
            hit = next((name for name, _ in chain if name in originals), None)
        if hit is not None:
            by_fx[n.name] = originals[hit]

    def source_node(onnx_node):
        for prop in onnx_node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
                return by_fx.get(scopes[-1]) if scopes else None
        return None

    producer = {out: node for node in model.graph.node for out in node.output}
    shapes = {}  # per-sample static shapes the exporter recorded (batch first, its size ignored)
    for v in (*model.graph.value_info, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) > 1 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[v.name] = (1, *(d.dim_value for d in dims[1:]))
    name_map: dict[str, str] = {}
    for node in model.graph.node:
        if quantized:
            if node.op_type != "QuantizeLinear":
                continue
            src_onnx = producer.get(node.input[0])
            src = source_node(src_onnx) if src_onnx is not None else None
            if src is None:
                continue
            layer = src.meta.get("mq_fused_into") or (layer_name(src) if "mq_name" in src.meta else None)
        else:
            src = source_node(node)
            layer = layer_name(src) if src is not None and "mq_name" in src.meta else None
            val = src.meta.get("val") if layer else None
            shape = shapes.get(node.output[0]) if node.output else None
            if isinstance(val, torch.Tensor) and shape is not None and not fits(shape, tuple(val.shape), False):
                # torch.export replays a view chain when a reshape needs a copy, and names the replayed
                # views after that reshape: ShuffleNetV1's final shuffle reshape also named its rank-5 view
                continue
        if layer and node.output and node.output[0]:
            name_map.setdefault(layer, node.output[0])
    if quantized:
        from .onnx import readers_of

        taken = set(name_map.values())
        readers = readers_of(model.graph.node)
        for layer, out in name_map.items():
            after = _after_channel_clamp(readers, out)
            if after not in taken:
                name_map[layer] = after
    return name_map


def _after_channel_clamp(readers: dict[str, list], out: str) -> str:
    """The QuantizeLinear output after CLE's per-channel clamp when ``out`` (a conv's QuantizeLinear) feeds
    one: ``Q → DQ → Max / Min → Q``; else ``out``. The exporter loses the clamp's provenance (its ONNX
    nodes name a ``clamp`` the graph does not have), so it is found by structure."""
    from .onnx import clamp_chain

    dq = readers.get(out, [])
    if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
        return out
    found = clamp_chain(readers, dq[0].output[0])
    return out if found is None else found[1].output[0]

