"""Read a TFLite flatbuffer without running it: ops, tensors with quantization, metadata.

Uses the schema bindings that the LiteRT packages ship (``ai_edge_litert.schema_py_generated``): the
interpreter API cannot say which tensors are constants or read the file's metadata buffers, and the
op list it reports is the delegated graph, not the file's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["TFLiteOp", "TFLiteTensor", "TFLiteModelInfo", "read_tflite", "rename_tensors", "inline_buffers",
           "dynamic_batch",
           "TFLITE_METADATA_KEY", "WEIGHTED_OPS"]

TFLITE_METADATA_KEY = "mobilequant"
# Builtin ops whose input 1 is the weight and input 2 the bias.
WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})

_TYPE_NAMES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource", 14: "variant",
    15: "uint32", 16: "uint16", 17: "int4",
}


@dataclass(frozen=True)
class TFLiteTensor:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    constant: bool  # has data in the file (weights, biases, shape operands)
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    axis: int | None  # quantized dimension when per-channel

    @property
    def quantized(self) -> bool:
        return len(self.scales) > 0


@dataclass(frozen=True)
class TFLiteOp:
    index: int
    name: str  # builtin operator name, e.g. CONV_2D
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    fused_activation: str | None


@dataclass(frozen=True)
class TFLiteModelInfo:
    ops: tuple[TFLiteOp, ...]
    tensors: tuple[TFLiteTensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    metadata: dict[str, bytes]

    def tensor(self, index: int) -> TFLiteTensor:
        return self.tensors[index]


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # the converter ships the same bindings
        from litert_converter import schema_py_generated as schema
    return schema


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


_ACTIVATION_OPTIONS = ("Conv2DOptions", "DepthwiseConv2DOptions", "FullyConnectedOptions", "AddOptions",
                       "MulOptions", "SubOptions", "Pool2DOptions", "ConcatenationOptions")


def _fused_activation(schema, op, opts_names, act_names) -> str | None:
    kind = opts_names.get(op.BuiltinOptionsType())
    if kind not in _ACTIVATION_OPTIONS:
        return None
    table = op.BuiltinOptions()
    if table is None:
        return None
    opts = getattr(schema, kind)()
    opts.Init(table.Bytes, table.Pos)
    return act_names.get(opts.FusedActivationFunction(), "NONE")


def read_tflite(data: bytes, label: str = "model") -> TFLiteModelInfo:
    """Parse a TFLite flatbuffer (first subgraph). :class:`InputError` when it is not one."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InputError(f"{label} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
    schema = _schema()
    try:
        model = schema.Model.GetRootAsModel(data, 0)
        op_names = _enum_names(schema.BuiltinOperator)
        opts_names = _enum_names(schema.BuiltinOptions)
        act_names = _enum_names(schema.ActivationFunctionType)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = op_names.get(code, f"OP_{code}")
            if name == "CUSTOM":
                name = f"CUSTOM:{(oc.CustomCode() or b'').decode()}"
            codes.append(name)
        for i in range(model.BuffersLength()):  # every buffer must lie inside the file (truncation)
            buf = model.Buffers(i)
            if buf.DataLength():
                buf.DataAsNumpy()
            if buf.Size() and buf.Offset() + buf.Size() > len(data):
                raise ValueError("buffer past the end of the file")
        sub = model.Subgraphs(0)
        tensors = []
        for i in range(sub.TensorsLength()):
            t = sub.Tensors(i)
            buf = model.Buffers(t.Buffer())
            constant = buf is not None and (buf.DataLength() > 0 or buf.Size() > 0)
            q = t.Quantization()
            scales, zps, axis = (), (), None
            if q is not None and q.ScaleLength() > 0:
                scales = tuple(float(s) for s in q.ScaleAsNumpy())
                zps = tuple(int(z) for z in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (0,) * len(scales)
                axis = int(q.QuantizedDimension()) if len(scales) > 1 else None
            shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            tensors.append(TFLiteTensor(i, (t.Name() or b"").decode("utf-8", "replace"),
                                        _TYPE_NAMES.get(t.Type(), str(t.Type())), shape, constant, scales, zps, axis))
        ops = []
        for i in range(sub.OperatorsLength()):
            op = sub.Operators(i)
            ins = tuple(int(x) for x in op.InputsAsNumpy()) if op.InputsLength() else ()
            outs = tuple(int(x) for x in op.OutputsAsNumpy()) if op.OutputsLength() else ()
            ops.append(TFLiteOp(i, codes[op.OpcodeIndex()], ins, outs,
                                _fused_activation(schema, op, opts_names, act_names)))
        metadata = {}
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            buf = model.Buffers(md.Buffer())
            if buf.DataLength():
                payload = bytes(buf.DataAsNumpy().tobytes())
            elif buf.Size():
                payload = bytes(data[buf.Offset(): buf.Offset() + buf.Size()])
            else:
                payload = b""
            metadata[(md.Name() or b"").decode()] = payload
        inputs = tuple(int(x) for x in sub.InputsAsNumpy())
        outputs = tuple(int(x) for x in sub.OutputsAsNumpy())
    except InputError:
        raise
    except Exception as e:  # flatbuffers raises IndexError / struct.error etc. on a damaged buffer
        raise InputError(f"{label} is a damaged TFLite model ({type(e).__name__}: truncated or corrupt)") from None
    return TFLiteModelInfo(tuple(ops), tuple(tensors), inputs, outputs, metadata)


def tensor_values(data: bytes, index: int) -> np.ndarray | None:
    """Raw constant data of tensor ``index`` (as stored), or None when it has none."""
    schema = _schema()
    model = schema.Model.GetRootAsModel(data, 0)
    t = model.Subgraphs(0).Tensors(index)
    buf = model.Buffers(t.Buffer())
    if buf is None or buf.DataLength() == 0:
        return None
    dtype = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int8": np.int8,
             "uint8": np.uint8, "int64": np.int64, "int16": np.int16}.get(_TYPE_NAMES.get(t.Type()), np.uint8)
    raw = buf.DataAsNumpy().tobytes()
    shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def rename_tensors(data: bytes, names: dict[int, str]) -> bytes:
    """``data`` with the tensors of subgraph 0 renamed (``index → name``), re-serialised with LiteRT's own
    flatbuffer helpers (object API: the same bytes for the same input)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    tensors = model.subgraphs[0].tensors
    for index, name in names.items():
        tensors[index].name = name
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def inline_buffers(data: bytes) -> bytes:
    """``data`` with every buffer stored inside the flatbuffer (LiteRT's flatbuffer helpers resolve
    ``Buffer.offset`` / ``size`` on reading). ai-edge-quantizer writes the float16 file's buffers — the
    ``mobilequant`` metadata among them — after the flatbuffer, by offset: a reader of the standard schema
    sees empty buffers there, and only runtimes that know buffer offsets load the file, while its
    ``min_runtime_version`` still says 2.0.0. Files under 2 GiB need no offsets."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def dynamic_batch(data: bytes) -> bytes:
    """``data`` resizable to any batch (``resize_tensor_input``): each RESHAPE and SLICE that keeps the batch
    dimension takes any batch — a constant new shape ``[1, d1, …]`` applied to a ``[1, …]`` input of the same
    per-image size becomes ``[-1, d1, …]``, a SLICE of a ``[1, …]`` input from batch 0 with size ``[1, …]``
    gets size ``[-1, …]`` (all of it) — and every computed tensor of batch 1 gets the shape signature
    ``[-1, …]`` (the SLICE kernel otherwise checks its output against the batch-1 shape stored in the file).

    The converter writes the example's batch (1) into these shape operands. A file whose first op is such
    a RESHAPE — a one-channel NCHW input is moved to NHWC by a RESHAPE, not a TRANSPOSE — could not be
    resized to a batch of 4 (``resize_tensor_input``: "RESHAPE num_input_elements != num_output_elements"),
    and ShuffleNetV2's channel-split SLICEs cut any batch back to one image. A constant buffer shared by
    several ops is changed only when every one of them keeps the batch."""
    from ai_edge_litert.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    sg = model.subgraphs[0]
    codes = {i: max(code.builtinCode, code.deprecatedBuiltinCode) for i, code in enumerate(model.operatorCodes)}
    operand = {schema.BuiltinOperator.RESHAPE: 1, schema.BuiltinOperator.SLICE: 2}  # the shape / size input

    def ints(tensor_index: int) -> np.ndarray | None:
        t = sg.tensors[tensor_index]
        raw = model.buffers[t.buffer].data
        if t.type != schema.TensorType.INT32 or raw is None or len(raw) < 8:
            return None
        return np.frombuffer(bytes(raw), np.int32)

    def keeps_batch(op) -> bool:
        kind, src = codes[op.opcodeIndex], sg.tensors[op.inputs[0]]
        values = ints(op.inputs[operand[kind]])
        old = None if src.shape is None else [int(d) for d in src.shape]
        if values is None or not old or len(old) < 2 or old[0] != 1 or values[0] != 1:
            return False
        if kind == schema.BuiltinOperator.RESHAPE:
            return int(np.prod(values[1:])) == int(np.prod(old[1:])) and bool((values[1:] > 0).all())
        begin = ints(op.inputs[1])
        return begin is not None and begin[0] == 0

    users: dict[int, list] = {}
    for op in sg.operators:
        k = operand.get(codes[op.opcodeIndex])
        if k is not None and len(op.inputs) > k and op.inputs[k] >= 0:
            users.setdefault(sg.tensors[op.inputs[k]].buffer, []).append(op)
    for buffer, ops in users.items():
        if not all(keeps_batch(op) for op in ops):
            continue
        new = np.frombuffer(bytes(model.buffers[buffer].data), np.int32).copy()
        new[0] = -1
        model.buffers[buffer].data = np.frombuffer(new.tobytes(), np.uint8)
        for op in ops:
            options = op.builtinOptions
            if options is not None and getattr(options, "newShape", None) is not None and len(options.newShape):
                options.newShape = [-1, *[int(d) for d in options.newShape[1:]]]
    for t in sg.tensors:
        raw = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        if t.shape is not None and len(t.shape) >= 1 and int(t.shape[0]) == 1 and (raw is None or len(raw) == 0):
            t.shapeSignature = [-1, *(int(d) for d in t.shape[1:])]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
