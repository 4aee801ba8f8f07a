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
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
import torch.nn as nn

__all__ = ["activations_to_uint8", "lower_to_onnx", "store_initializers_fp16"]


def lower_to_onnx(module: nn.Module, example_input: torch.Tensor, *, precision: str):
    """``onnx.ModelProto`` of ``module`` (float or PT2E-quantized NCHW graph), batch dimension dynamic."""
    x = example_input[:2].detach()
    if x.shape[0] == 1:
        x = torch.cat([x, x])  # a size-1 dimension would be specialised by torch.export
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, optimize=True, verbose=False, report=False, input_names=["input"],
                                         output_names=["output"])
    model = onnx_program.model_proto
    if precision == "fp16":
        store_initializers_fp16(model)
    # the decomposed program the ONNX nodes were made from (its node names are in the node metadata)
    return model, getattr(onnx_program, "exported_program", None) or program


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
    Written by hand: onnxruntime's ``quantize_static`` writes uint8 activations for its own calibration,
    and no library pass converts an existing QDQ graph's parameters without re-deriving them.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    values = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = a.t
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_io = {v.name for v in graph.input} | {v.name for v in graph.output}

    def int8_zero_point(node) -> np.ndarray | None:
        if len(node.input) < 3 or node.input[2] not in values:
            return None
        zp = numpy_helper.to_array(values[node.input[2]])
        return zp if zp.dtype == np.int8 else None

    made: dict[str, str] = {}

    def to_uint8(node) -> None:
        name = node.input[2]
        if name not in made:
            zp = numpy_helper.to_array(values[name]).astype(np.int16) + 128
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
    return len(changed)
