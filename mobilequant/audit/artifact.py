"""Open an artifact for auditing and read what it says about itself (name map, provenance).

The file type is decided by content, not by suffix: a TFLite flatbuffer carries the ``TFL3``
identifier; anything else must parse as an ONNX ``ModelProto``. Provenance lives in the file's
``mobilequant`` metadata entry (TFLite: a metadata buffer; ONNX: ``metadata_props``), a JSON object with
``model_name``, ``quant_table_sha256``, ``target`` and ``name_map`` (see docs/notes/audit_needs.md).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import InputError

__all__ = ["open_artifact", "artifact_provenance", "content_target", "METADATA_KEY"]

METADATA_KEY = "mobilequant"


def open_artifact(path: str | os.PathLike, num_threads: int | None = 1):
    """A :class:`TFLiteGraph` or :class:`OnnxGraph` for ``path``; :class:`InputError` for anything else."""
    from ..export.artifact import check_model_file

    path = Path(path)
    check_model_file(path, "artifact")  # a pipe or /dev/zero would block or be read without end below
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"cannot read artifact {path}: {e.strerror or e}") from None
    if len(head) >= 8 and head[4:8] == b"TFL3":
        from .tflite_graph import TFLiteGraph

        return TFLiteGraph(str(path), num_threads=num_threads)
    if path.suffix.lower() == ".tflite":
        from ..runtime.tflite import check_tflite_file

        check_tflite_file(path)  # raises, saying so when the file is an ONNX model
    from .onnx_graph import OnnxGraph

    try:
        return OnnxGraph(str(path), num_threads=num_threads)
    except InputError as e:
        m = re.search(r"\(([^()]*)\)\s*$", str(e))  # the reader's reason, e.g. "DecodeError: truncated or corrupt"
        detail = m.group(1) if m else str(e)
        raise InputError(f"{path} is neither a TFLite nor an ONNX model ({detail})") from None


def artifact_provenance(graph) -> dict:
    """The ``mobilequant`` metadata JSON of the artifact (``{}`` when it has none or it is unreadable)."""
    raw = graph.metadata().get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8").rstrip("\x00"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


_ONNX_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                            "MatMulInteger", "DynamicQuantizeLinear"})


def constant_tensors(graph) -> list:
    """The file's constants (weights, biases, shapes) as ``(shape, dtype, quantized)``: ONNX initializers,
    TFLite tensors that ops read and none writes."""
    if graph.target == "onnx":
        return [(a.shape, a.dtype, False) for a in graph.init.values()]
    written = {o for _name, _ins, outs in graph.ops for o in outs}
    read = {i for _name, ins, _outs in graph.ops for i in ins}
    return [(tuple(t.shape), t.dtype, t.quantized) for t in graph.tensors
            if t.index in read - written and t.index not in graph.inputs]


def content_target(graph) -> str:
    """The target the file's content is, whatever its metadata says: ``<format>-int8`` when it computes on
    integer tensors (ONNX: quantize / dequantize or integer ops; TFLite: an op writes a quantized tensor),
    ``-fp16`` when it stores float16 weights, else ``-fp32``."""
    import numpy as np

    if graph.target == "onnx":
        if {n.op_type for n in graph.model.graph.node} & _ONNX_INT8_OPS:
            return "onnx-int8"
    else:
        written = {o for _name, _ins, outs in graph.ops for o in outs}
        if any(t.quantized for t in graph.tensors if t.index in written):
            return "tflite-int8"
    fp16 = any(dtype == np.float16 for _shape, dtype, _q in constant_tensors(graph))
    return f"{graph.target}-{'fp16' if fp16 else 'fp32'}"
