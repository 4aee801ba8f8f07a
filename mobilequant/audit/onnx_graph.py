"""An ONNX (QDQ) artifact as the audit sees it — the same interface as :class:`~.tflite_graph.TFLiteGraph`.

* Intermediates: a copy of the model with the wanted tensors added as graph outputs
  (:func:`mobilequant.runtime.with_intermediate_outputs`), run once per batch in ONNX Runtime; int8
  tensors are dequantized with the scale / zero point of the ``QuantizeLinear`` that produced them.
* A layer in isolation: the sub-graph from the layer's input boundaries to its output, cut with
  ``onnx.utils.Extractor`` (the library's own extraction). A boundary that is a ``QuantizeLinear``
  output is cut *before* that node, so the float reference goes through the artifact's own
  ``QuantizeLinear`` with the artifact's own scale.
* Weights: the int8 initializer behind the ``DequantizeLinear`` feeding a ``Conv`` / ``Gemm`` /
  ``MatMul`` (or a float initializer behind a ``QuantizeLinear → DequantizeLinear`` pair).

ONNX keeps torch's NCHW layout, so no transposes are involved.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import InputError
from ..runtime import OrtRunner, load_onnx_model, with_intermediate_outputs
from .tflite_graph import TensorInfo
from .weights import QuantizedWeights

__all__ = ["OnnxGraph"]

_WEIGHT_OPS = {"Conv", "Gemm", "MatMul"}
# between a conv and its layer's output: activations, and CLE's per-channel clamp (Max / Min, on the
# codes or between a DequantizeLinear and a QuantizeLinear)
_PASS_THROUGH = {"Relu", "Clip", "Min", "Max", "DequantizeLinear"}


def _np_dtype(elem_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


class OnnxGraph:
    """Parsed ONNX artifact."""

    target = "onnx"

    def __init__(self, path: str, num_threads: int | None = 1):
        import onnx
        from onnx import numpy_helper

        self.path = str(path)
        self.num_threads = num_threads or 1
        self.model = load_onnx_model(self.path)
        g = self.model.graph
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.init]
        self.graph_outputs = [o.name for o in g.output]
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # best effort: shapes are only needed for layout checks
            inferred = self.model
        self.inferred = inferred
        self._extractor = None
        self.value_info = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                                  *inferred.graph.output)}
        self._runner_cache: dict[tuple, OrtRunner] = {}

    # -- structure ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, bytes]:
        return {p.key: p.value.encode() for p in self.model.metadata_props}

    def has_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.graph_inputs

    def _qparams(self, name: str):
        """(scale, zero point, axis) of an integer tensor, from its QuantizeLinear or DequantizeLinear."""
        node = self.producer.get(name)
        if node is None or node.op_type != "QuantizeLinear":
            node = next((c for c in self.consumers.get(name, []) if c.op_type == "DequantizeLinear"), None)
        if node is None or len(node.input) < 2 or node.input[1] not in self.init:
            return None
        scale = np.asarray(self.init[node.input[1]], np.float32).reshape(-1)
        zp = (np.asarray(self.init[node.input[2]]).reshape(-1).astype(np.int64) if len(node.input) > 2 and node.input[2]
              else np.zeros(1, np.int64))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return scale, zp, axis

    def info(self, name: str) -> TensorInfo:
        vi = self.value_info.get(name)
        shape, dynamic, dtype = (), True, np.dtype(np.float32)
        if vi is not None and vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            dtype = _np_dtype(tt.elem_type) if tt.elem_type else dtype
            dims = list(tt.shape.dim)
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else 1 for d in dims)
            dynamic = not dims or not dims[0].HasField("dim_value")
        q = self._qparams(name) if np.issubdtype(dtype, np.integer) else None
        if q is None and name in self.producer and self.producer[name].op_type == "QuantizeLinear":
            q = self._qparams(name)
            node = self.producer[name]
            zp_name = node.input[2] if len(node.input) > 2 else ""
            dtype = np.dtype(self.init[zp_name].dtype) if zp_name in self.init else np.dtype(np.uint8)
        scale, zp, axis = q if q is not None else (np.zeros(0, np.float32), np.zeros(0, np.int64), 0)
        return TensorInfo(-1, name, shape, dynamic, dtype, scale, zp, axis)

    def input_info(self) -> TensorInfo:
        return self.info(self.graph_inputs[0])

    def output_info(self) -> TensorInfo:
        return self.info(self.graph_outputs[0])

    def activation_elements(self) -> int:
        """Elements of every tensor a node writes, per image (shapes from shape inference; unknown: 0)."""
        total = 0
        for name in self.producer:
            vi = self.value_info.get(name)
            if vi is not None and vi.type.HasField("tensor_type"):
                dims = list(vi.type.tensor_type.shape.dim)[1:]
                if dims and all(d.HasField("dim_value") for d in dims):
                    total += int(np.prod([d.dim_value for d in dims]))
        return total

    def producer_op(self, name: str) -> str | None:
        node = self.producer.get(name)
        return None if node is None else node.op_type

    def _compute_node(self, name: str):
        """The Conv / Gemm / MatMul whose result (through Q, Relu / Clip) is tensor ``name``."""
        node = self.producer.get(name)
        seen = 0
        while node is not None and seen < 6:
            if node.op_type in _WEIGHT_OPS:
                return node
            if node.op_type not in ("QuantizeLinear", *_PASS_THROUGH):
                return None
            node = self.producer.get(node.input[0])
            seen += 1
        return None

    def weights(self, name: str) -> QuantizedWeights | None:
        node = self._compute_node(name)
        if node is None or len(node.input) < 2:
            return None
        dq = self.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        src = dq.input[0]
        q = self._qparams(src)
        if q is None:
            return None
        scale, zp, axis = q
        if src in self.init:
            codes = np.asarray(self.init[src])
        else:  # float initializer → QuantizeLinear → DequantizeLinear (quantized at run time)
            qn = self.producer.get(src)
            if qn is None or qn.op_type != "QuantizeLinear" or qn.input[0] not in self.init:
                return None
            w = np.asarray(self.init[qn.input[0]], np.float64)
            zp_arr = self.init.get(qn.input[2]) if len(qn.input) > 2 else None
            dt = np.dtype(zp_arr.dtype) if zp_arr is not None else np.dtype(np.uint8)
            shape = [1] * w.ndim
            if scale.size > 1:
                shape[axis] = -1
            codes = np.clip(np.round(w / scale.reshape(shape)) + zp.reshape(shape), np.iinfo(dt).min, np.iinfo(dt).max)
            codes = codes.astype(dt)
        lim = np.iinfo(codes.dtype)
        codes = codes.astype(np.int32)
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if not trans_b:
                codes, axis = codes.T, 1 - axis
        elif node.op_type == "MatMul":  # (in, out) → (out, in)
            codes, axis = codes.T, 1 - axis
        if scale.size > 1 and axis != 0:
            return None  # not per output channel: not a layout the health checks understand
        return QuantizedWeights(codes=codes, scale=scale.astype(np.float64), zero_point=zp, per_channel=scale.size > 1,
                                axis=0, qmin=int(lim.min), qmax=int(lim.max), op=node.op_type)

    # -- running -----------------------------------------------------------------------------------
    def _runner(self, names: tuple[str, ...]) -> OrtRunner:
        if names not in self._runner_cache:
            model = with_intermediate_outputs(self.model, list(names)) if names else self.model
            self._runner_cache[names] = OrtRunner(model, num_threads=self.num_threads)
        return self._runner_cache[names]

    def run(self, x: np.ndarray, names: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        names = tuple(n for n in names)
        outs = self._runner(names).outputs_by_name(x)
        out = np.asarray(outs[self.graph_outputs[0]], np.float32)
        return out, {n: _dequantize(outs[n], self.info(n)) for n in names}

    # -- isolation ---------------------------------------------------------------------------------
    def segment(self, output: str, boundary: Iterable[str]) -> OnnxSegment:
        stops: dict[str, str] = {}  # tensor where the cut is made → the boundary name it stands for
        for b in boundary:
            if b == output or not self.has_tensor(b):
                continue
            node = self.producer.get(b)
            cut = node.input[0] if node is not None and node.op_type == "QuantizeLinear" else b
            stops[cut] = b
        for i in self.graph_inputs:
            stops.setdefault(i, i)
        inputs: dict[str, str] = {}
        ops: list = []
        todo, seen = [output], set()
        while todo:
            t = todo.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in stops and t != output:
                inputs[t] = stops[t]
                continue
            node = self.producer.get(t)
            if node is None:
                continue  # initializer
            if node not in ops:
                ops.append(node)
            todo += [i for i in node.input if i not in self.init]
        return OnnxSegment(self, inputs, output, [n.op_type for n in reversed(ops)])


class OnnxSegment:
    """A runnable one-layer sub-model of an :class:`OnnxGraph`."""

    def __init__(self, graph: OnnxGraph, cuts: dict[str, str], output: str, op_names: list[str]):
        import onnx.utils

        self.graph = graph
        self.output = output
        self.op_names = op_names
        self.inputs = list(cuts.values())  # boundary names (what the caller feeds)
        self._cuts = cuts  # cut tensor → boundary name
        try:
            if graph._extractor is None:  # needs every cut tensor's type: give it the shape-inferred model
                graph._extractor = onnx.utils.Extractor(graph.inferred)
            sub = graph._extractor.extract_model(list(cuts), [output])
        except Exception as e:  # the extractor raises plain exceptions on graphs it cannot cut
            raise InputError(f"cannot cut layer output {output!r} out of {graph.path}: {e}") from None
        self._session = _session(sub, graph.num_threads)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        arrays = {}
        for cut, name in self._cuts.items():
            a = np.ascontiguousarray(feeds[name], dtype=np.float32)
            info = self.graph.info(cut)
            arrays[cut] = a if not np.issubdtype(info.dtype, np.integer) else _quantize(a, info)
        n = len(next(iter(arrays.values())))
        fixed = self._session.get_inputs()[0].shape[0]
        if isinstance(fixed, int) and fixed != n:  # a fixed-batch file: run it chunk by chunk
            outs = []
            for s in range(0, n, fixed):
                chunk = {k: v[s:s + fixed] for k, v in arrays.items()}
                k = len(next(iter(chunk.values())))
                chunk = {name: np.concatenate([v, np.repeat(v[:1], fixed - k, 0)]) for name, v in chunk.items()}
                outs.append(self._session.run([self.output], chunk)[0][:k])
            out = np.concatenate(outs)
        else:
            (out,) = self._session.run([self.output], arrays)
        return _dequantize(out, self.graph.info(self.output))


def _session(model, num_threads: int):
    """An ONNX Runtime CPU session for a sub-model (OrtRunner takes single-input models only; an add has two)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _quantize(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    lim = np.iinfo(info.dtype)
    return np.clip(np.round(a / info.scale[0]) + info.zero_point[0], lim.min, lim.max).astype(info.dtype)


def _dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer) or info.scale.size == 0:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - np.float32(info.zero_point[0])) * np.float32(info.scale[0])).astype(np.float32)
