"""Lower a torch graph to ONNX with ``torch.onnx.export(..., dynamo=True)``.

* fp32: the float graph (BN folded) with a dynamic batch dimension, optimised by onnxscript.
* int8: ``QuantResult.graph`` (``fold_quantize=True``): int8 weight and int32 bias initializers feed
  ``DequantizeLinear``; activations go through ``QuantizeLinear → DequantizeLinear`` pairs (QDQ format,
  what ONNX Runtime fuses into integer kernels). The QDQ graph with float weights and an int32
  ``QuantizeLinear`` on the bias is not valid ONNX (QuantizeLinear has no int32 output type).
* fp16: the fp32 export with every conv / matmul weight initializer stored as float16 and cast back to
  float32 where it is used (:func:`store_initializers_fp16`); biases and other constants stay float32, as
  in TFLite's float16 files and the torch reference (``mobilequant.quant.fp16``). Written by hand
  because the two library routes do something else: onnxruntime's ``float16.convert_float_to_float16``
  makes the *computation* float16 (which the CPU provider has no kernels for on x86), and exporting the
  float16-constant graph lets the onnxscript optimiser fold the casts back into float32 initializers.
* int8 activations are stored as uint8 (:func:`activations_to_uint8`): the same real values (code + 128,
  zero point + 128), the form ONNX Runtime's integer kernels take on x86 and its NNAPI provider requires.
* CLE's per-channel clamps run on the integer codes (:func:`clamps_on_codes`), exactly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch
import torch.nn as nn

__all__ = ["activations_to_uint8", "clamp_chain", "clamps_on_codes", "constants", "lower_to_onnx", "readers_of",
           "store_initializers_fp16"]


def lower_to_onnx(module: nn.Module, example_input: torch.Tensor, *, precision: str):
    """``onnx.ModelProto`` of ``module`` (float or PT2E-quantized NCHW graph), batch dimension dynamic."""
    x = example_input[:2].detach()
    if x.shape[0] == 1:
        x = torch.cat([x, x])  # a size-1 dimension would be specialised by torch.export
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    sink = io.StringIO()
    # the exporter's registry logs a warning per torchvision op it cannot register (torchvision is not a
    # dependency): three lines of noise on every export
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, optimize=True, verbose=False, report=False,
                                             input_names=["input"], output_names=["output"])
    finally:
        registry_log.setLevel(level)
    model = onnx_program.model_proto
    _name_batch_dim(model)
    if precision == "fp16":
        store_initializers_fp16(model)
    # the decomposed program the ONNX nodes were made from (its node names are in the node metadata)
    return model, getattr(onnx_program, "exported_program", None) or program


def _name_batch_dim(model) -> None:
    """Call the dynamic batch dimension ``batch`` (the exporter names it after an internal symbol, ``s77``,
    which an app or a shape-inference tool would have to read from the file): in the graph's inputs,
    outputs and value infos, also inside a symbolic expression such as ``2*s77``."""
    import re

    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    symbol = dims[0].dim_param if dims and dims[0].HasField("dim_param") else ""
    if not symbol or symbol == "batch":
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in info.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and pattern.search(d.dim_param):
                d.dim_param = pattern.sub("batch", d.dim_param)


# The weight input of each op, by index: what float16 storage is for (biases are a fraction of a percent
# of the bytes; stored in float16 they added rounding on large-activation nets: ShuffleNetV1 g3's
# onnx-fp16 file lost 0.03 pp with them, its tflite-fp16 file 0.00).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}


def store_initializers_fp16(model) -> int:
    """Store each float32 weight initializer (see ``_WEIGHT_INPUTS``) of more than one element as float16
    + ``Cast(to=FLOAT)``; return how many."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {n.input[i] for n in graph.node for i in _WEIGHT_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    casts, count = [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name not in weights:
            continue
        value = numpy_helper.to_array(init)
        if value.size <= 1 or not np.all(np.abs(value) <= np.finfo(np.float16).max):
            continue
        name = init.name
        half = numpy_helper.from_array(value.astype(np.float16), name=f"{name}_fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                      name=f"{name}_to_float32"))
        count += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return count


def activations_to_uint8(model) -> int:
    """Store each int8 activation ``QuantizeLinear → DequantizeLinear`` pair as uint8 (zero point + 128);
    return how many ``QuantizeLinear`` nodes changed.

    Exact: ``(q + 128) − (z + 128) = q − z`` over the same 256 codes, so every value the file computes
    is the one the quant table describes (whose zero points stay the TFLite int8 ones). Weights (int8
    initializers, symmetric) and int32 biases keep their types, as does a pair at a graph input or output.

    Why: ONNX Runtime runs QDQ groups as integer kernels only when a node's input and output activations
    have one type, and on x86 it converts int8 activation pairs to uint8 itself — except the pairs whose
    ``DequantizeLinear`` feeds two nodes (the start of each residual branch). On MobileNetV2 0.5 that left
    15 of 52 convolutions and all 10 residual adds in float between DequantizeLinear / QuantizeLinear
    (1.69 ms per image on one thread; 0.60 ms stored as uint8, the same top-1 on the 10k test split).
    Written by hand: no ONNX or ONNX Runtime tool rewrites the activation type of an existing QDQ graph
    (ORT's own conversion at load time is the incomplete one above).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    values = constants(graph)
    consumers = readers_of(graph.node)
    graph_io = {v.name for v in graph.input} | {v.name for v in graph.output}

    def int8_zero_point(node) -> np.ndarray | None:
        zp = values.get(node.input[2]) if len(node.input) > 2 else None
        return zp if zp is not None and zp.dtype == np.int8 else None

    made: dict[str, str] = {}

    def to_uint8(node) -> None:
        name = node.input[2]
        if name not in made:
            zp = values[name].astype(np.int16) + 128
            made[name] = f"{name}_uint8"
            graph.initializer.append(numpy_helper.from_array(zp.astype(np.uint8), made[name]))
        node.input[2] = made[name]

    changed = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in values or int8_zero_point(node) is None:
            continue
        out = node.output[0]
        readers = consumers.get(out, [])
        if out in graph_io or not readers or any(
                r.op_type != "DequantizeLinear" or int8_zero_point(r) is None for r in readers):
            continue
        to_uint8(node)
        for r in readers:
            to_uint8(r)
        changed.add(out)
    for info in list(graph.value_info) + list(graph.output):
        if info.name in changed:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    _drop_unused_initializers(graph)
    return len(changed)


def _drop_unused_initializers(graph) -> None:
    """Remove initializers no node reads any more (ONNX Runtime warns about each one)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def readers_of(nodes) -> dict[str, list]:
    """The nodes that read each tensor, by tensor name."""
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def clamp_chain(readers: dict[str, list], name: str):
    """``(Max / Min nodes, QuantizeLinear)`` when tensor ``name`` (a DequantizeLinear's output) is read only
    by a chain of two-input Max / Min ending in a single QuantizeLinear — CLE's per-channel clamp as the
    exporter writes it; else None. The bounds (each op's other input) are the caller's to check."""
    chain = []
    while len(readers.get(name, [])) == 1 and readers[name][0].op_type in ("Max", "Min") \
            and len(readers[name][0].input) == 2:
        chain.append(readers[name][0])
        name = chain[-1].output[0]
    last = readers.get(name, [])
    if not chain or len(last) != 1 or last[0].op_type != "QuantizeLinear":
        return None
    return chain, last[0]


def constants(graph) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of an ONNX graph, by name, as arrays."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def clamps_on_codes(model) -> int:
    """Run each ``DequantizeLinear → Max / Min (constant bounds) → QuantizeLinear`` whose two ends have
    the same parameters as ``Max`` / ``Min`` on the integer codes; return how many chains changed.

    CLE replaces ReLU6 by a clamp with per-channel bounds (``mobilequant.quant.cle``) whose input and
    output share one scale and zero point (as TFLite's MINIMUM / MAXIMUM require). ONNX Runtime has no
    integer kernel for that chain and runs it in float, with a DequantizeLinear and a QuantizeLinear
    around it: on MobileNetV2 0.5 the 35 clamps took 55 % of the per-tensor + CLE file's time. With one
    scale ``s`` and zero point ``z`` at both ends the chain is exact on codes: quantizing is monotone and
    gives back every code it dequantized, so ``Q(min(DQ(q), b)) = min(q, Q(b))`` (and the same for max),
    with each bound quantized once, here. A bound no code can pass (a max at or below the lowest code, a
    min at or above the highest) is left out. Written by hand: no ONNX or ONNX Runtime pass does this.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    values = constants(graph)
    nodes = list(graph.node)  # one set of node objects for the lookups below (identity = id())
    producer = {o: n for n in nodes for o in n.output}
    consumers = readers_of(nodes)
    graph_outputs = {v.name for v in graph.output}

    def params(node):
        if len(node.input) < 3 or node.input[1] not in values or node.input[2] not in values:
            return None
        return values[node.input[1]], values[node.input[2]]

    drop, new_nodes, count = set(), {}, 0
    for dq in nodes:
        if dq.op_type != "DequantizeLinear" or dq.input[0] in values or params(dq) is None:
            continue
        found = clamp_chain(consumers, dq.output[0])
        if found is None or params(found[1]) is None:
            continue
        ops, q = found
        inputs = [dq.output[0]] + [op.output[0] for op in ops[:-1]]
        bounds = [next((i for i in op.input if i != x), None) for op, x in zip(ops, inputs)]
        if any(b not in values for b in bounds) or any(x in graph_outputs for x in inputs + [ops[-1].output[0]]):
            continue
        chain = [(op, values[b]) for op, b in zip(ops, bounds)]
        (s_in, z_in), (s_out, z_out) = params(dq), params(q)
        if s_in.size != 1 or s_in.tobytes() != s_out.tobytes() or z_in.tobytes() != z_out.tobytes() \
                or z_in.dtype != z_out.dtype:
            continue
        scale, zero, dtype = np.float32(s_in.reshape(())), int(z_in.reshape(())), z_in.dtype
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        made, src = [], dq.input[0]
        for op, bound in chain:
            # as QuantizeLinear computes it: float32 division, round half to even, saturate
            codes = np.clip(np.round(np.asarray(bound, np.float32) / scale) + zero, lo, hi)
            if (op.op_type == "Max" and codes.max() <= lo) or (op.op_type == "Min" and codes.min() >= hi):
                continue
            const = f"{op.name or op.output[0]}_codes"
            graph.initializer.append(numpy_helper.from_array(codes.astype(dtype), const))
            out = f"{op.output[0]}_codes"
            made.append(helper.make_node(op.op_type, [src, const], [out], name=f"{op.name or op.output[0]}_on_codes"))
            src = out
        if made:
            made[-1].output[0] = q.output[0]
        else:  # every bound a no-op: the quantized input is the output
            made.append(helper.make_node("Identity", [src], [q.output[0]], name=f"{q.name}_identity"))
        drop.update(id(n) for n in (dq, q, *(op for op, _ in chain)))
        new_nodes[id(q)] = made
        count += 1
    if count:
        kept = []
        for node in nodes:
            kept.extend(new_nodes.get(id(node), []))
            if id(node) not in drop:
                kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)
        produced = {o for n in graph.node for o in n.output}
        for vi in [vi for vi in graph.value_info if vi.name in producer and vi.name not in produced]:
            graph.value_info.remove(vi)  # tensors of the removed float chains
        _drop_unused_initializers(graph)
    return count
