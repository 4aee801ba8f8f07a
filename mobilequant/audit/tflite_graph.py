"""A TFLite artifact as the audit sees it: tensors, qparams, ops, intermediates, one-layer sub-models.

* Structure (ops, their input/output tensors, the model's metadata) comes from the flatbuffer, read
  with ``ai_edge_litert.tools.flatbuffer_utils`` (the LiteRT schema, no hand-written parser).
* Values come from the LiteRT ``Interpreter`` with ``experimental_preserve_all_tensors=True``, so
  every intermediate tensor can be read after ``invoke()``; tensor indices of the interpreter are the
  flatbuffer's indices of subgraph 0.
* A layer "in isolation" is a sub-model cut out of the artifact itself: the ops between the layer's
  input tensors and its output tensor, with the artifact's own int8 weights, biases, scales, zero points
  and fused activations. The audit feeds it the *float* reference of its inputs (quantized with the
  artifact's input scale) and so measures that layer's own error, in the real runtime. LiteRT has no
  API to run a slice of a model; rewriting the subgraph's operator list and inputs/outputs in the
  flatbuffer object and serialising it is the documented way to build a model with flatbuffer_utils.

Arrays handed out are float32, dequantized, in the file's layout (rank-4 tensors inside a TFLite
model are NHWC; the graph input keeps what the exporter gave it). Converting to torch's NCHW is the
caller's job (:mod:`mobilequant.export.layout`).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..runtime.tflite import check_tflite_file, interpreter_class, quantize_array
from .weights import QuantizedWeights

__all__ = ["TFLiteGraph", "TensorInfo", "Segment"]

_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dynamic_batch: bool
    dtype: np.dtype
    scale: np.ndarray  # empty when the tensor is float
    zero_point: np.ndarray
    axis: int

    @property
    def quantized(self) -> bool:
        return self.scale.size > 0 and np.issubdtype(self.dtype, np.integer)


def _interpreter(content: bytes, num_threads: int | None = 1, delegates: bool = True):
    """A LiteRT interpreter that keeps every tensor.

    ``delegates=True`` keeps the default XNNPACK delegate — the kernels a phone's CPU runs. With
    ``experimental_preserve_all_tensors`` LiteRT delegates op by op, so intermediates stay readable;
    :meth:`TFLiteGraph.check_intermediates` compares them with the delegate-free reference kernels once.
    """
    cls = interpreter_class()
    kwargs = {"model_content": content, "num_threads": num_threads, "experimental_preserve_all_tensors": True}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = importlib.import_module(cls.__module__).OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():
        # preserve_all_tensors warns that it is meant for debugging: that is exactly what the audit does.
        warnings.simplefilter("ignore", UserWarning)
        return cls(**kwargs)


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float → the tensor's storage type, with the runtime's own arithmetic (``quantize_array``)."""
    if not info.quantized:
        return x.astype(info.dtype, copy=False)
    return quantize_array(x, float(info.scale.reshape(-1)[0]), int(info.zero_point.reshape(-1)[0]), info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    if not info.quantized:
        return np.asarray(q, dtype=np.float32)
    if info.scale.size == 1:
        return ((q.astype(np.float32) - np.float32(info.zero_point[0])) * np.float32(info.scale[0])).astype(np.float32)
    shape = [1] * q.ndim
    shape[info.axis] = -1
    return ((q.astype(np.float32) - info.zero_point.reshape(shape)) * info.scale.reshape(shape)).astype(np.float32)


def _inline_buffers(model, content: bytes) -> None:
    """Move buffers stored after the flatbuffer (``offset`` / ``size``: ai-edge-quantizer's float16 files,
    files over 2 GB) into the model object, so that metadata reads and the cut segments carry them."""
    for buf in model.buffers or []:
        size = int(getattr(buf, "size", 0) or 0)
        if buf.data is None and size:
            offset = int(buf.offset)
            buf.data = np.frombuffer(content[offset:offset + size], dtype=np.uint8).copy()
            buf.offset = buf.size = 0


class TFLiteGraph:
    """Parsed TFLite artifact (subgraph 0, the serving signature)."""

    target = "tflite"

    def __init__(self, path: str, num_threads: int | None = 1):
        from ai_edge_litert.tools import flatbuffer_utils

        self.path = str(path)
        self.num_threads = num_threads
        self.content = check_tflite_file(self.path)
        self.delegates = True
        try:
            self.model = flatbuffer_utils.convert_bytearray_to_object(bytearray(self.content))
            _inline_buffers(self.model, self.content)
            self.interpreter = _interpreter(self.content, num_threads)
            self.interpreter.allocate_tensors()
        except Exception as e:  # the flatbuffer reader and LiteRT raise RuntimeError, ValueError, IndexError...
            raise InputError(f"{self.path} cannot be loaded as a TFLite model (truncated or corrupt?): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self._fbu = flatbuffer_utils
        sg = self.model.subgraphs[0]
        self.tensors = [self._tensor_info(d) for d in sorted(self.interpreter.get_tensor_details(), key=lambda d: d["index"])]
        self.by_name: dict[str, int] = {}
        for t in self.tensors:
            self.by_name.setdefault(t.name, t.index)
        self.ops = [(flatbuffer_utils.opcode_to_name(self.model, op.opcodeIndex), [int(i) for i in op.inputs],
                     [int(i) for i in op.outputs]) for op in sg.operators]
        self.producer = {o: k for k, (_n, _i, outs) in enumerate(self.ops) for o in outs}
        self.inputs = [int(i) for i in sg.inputs]
        self.outputs = [int(i) for i in sg.outputs]
        self._runner = None

    # -- structure ---------------------------------------------------------------------------------
    @staticmethod
    def _tensor_info(d: dict) -> TensorInfo:
        qp = d["quantization_parameters"]
        sig = d.get("shape_signature", d["shape"])
        return TensorInfo(int(d["index"]), d["name"], tuple(int(s) for s in d["shape"]),
                          bool(len(sig) and sig[0] == -1), np.dtype(d["dtype"]),
                          np.asarray(qp["scales"], np.float32), np.asarray(qp["zero_points"], np.int64),
                          int(qp["quantized_dimension"]))

    def metadata(self) -> dict[str, bytes]:
        """The flatbuffer's metadata entries, name → raw buffer bytes."""
        out = {}
        for md in self.model.metadata or []:
            name = md.name.decode() if isinstance(md.name, bytes) else str(md.name)
            data = self.model.buffers[md.buffer].data
            out[name] = bytes(np.asarray(data, dtype=np.uint8)) if data is not None else b""
        return out

    def has_tensor(self, name: str) -> bool:
        return name in self.by_name

    def info(self, name: str) -> TensorInfo:
        return self.tensors[self.by_name[name]]

    def input_info(self) -> TensorInfo:
        return self.tensors[self.inputs[0]]

    def output_info(self) -> TensorInfo:
        return self.tensors[self.outputs[0]]

    def activation_elements(self) -> int:
        """Elements of every tensor an op writes, per image (the batch dimension left out)."""
        return sum(int(np.prod(self.tensors[t].shape[1:])) for t in self.producer if self.tensors[t].shape)

    def producer_op(self, name: str) -> str | None:
        k = self.producer.get(self.by_name[name])
        return None if k is None else self.ops[k][0]

    def weights(self, name: str) -> QuantizedWeights | None:
        """The int8 kernel of the op that produces tensor ``name`` (directly or through a per-channel clamp),
        in torch layout (O, I/g, kh, kw) / (O, I)."""
        k = self.producer.get(self.by_name[name])
        for _ in range(4):  # through CLE's per-channel clamp (MINIMUM / MAXIMUM after the conv)
            if k is None or self.ops[k][0] not in ("MINIMUM", "MAXIMUM"):
                break
            k = next((self.producer[i] for i in self.ops[k][1] if i in self.producer), None)
        if k is None:
            return None
        op, ins, _ = self.ops[k]
        if op not in _WEIGHT_OPS or len(ins) < 2 or ins[1] < 0:
            return None
        w = self.tensors[ins[1]]
        if not w.quantized:
            return None
        codes = np.asarray(self.interpreter.get_tensor(w.index))
        if op == "CONV_2D":  # O, kh, kw, I → O, I, kh, kw
            codes, axis = codes.transpose(0, 3, 1, 2), 0
        elif op == "DEPTHWISE_CONV_2D":  # 1, kh, kw, O → O, 1, kh, kw
            codes, axis = codes.transpose(3, 0, 1, 2), 0
        else:  # FULLY_CONNECTED: O, I
            axis = 0
        per_channel = w.scale.size > 1
        return QuantizedWeights(codes=codes.astype(np.int32), scale=w.scale.astype(np.float64),
                                zero_point=w.zero_point, per_channel=per_channel, axis=axis,
                                qmin=int(np.iinfo(w.dtype).min), qmax=int(np.iinfo(w.dtype).max), op=op)

    # -- running -----------------------------------------------------------------------------------
    def run(self, x: np.ndarray, names: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the whole artifact on ``x`` (float32, the input tensor's layout); returns the output and the
        named tensors, dequantized, batch first."""
        names = list(names)
        if self._runner is None:
            self._runner = _BatchRunner(lambda: _interpreter(self.content, self.num_threads, self.delegates),
                                        [self.input_info()])
        fetch = [self.output_info()] + [self.info(n) for n in names]
        out, *inter = self._runner.run([x], fetch)
        return out, dict(zip(names, inter))

    def check_intermediates(self, x: np.ndarray, names: Iterable[str], max_mean_lsb: float = 1.0) -> str | None:
        """Compare the delegated run's tensors with LiteRT's delegate-free reference kernels on ``x``
        (float32, torch's N×C×H×W layout).

        Kernels may differ by a code here and there; a tensor whose mean difference exceeds
        ``max_mean_lsb`` codes was not preserved by the delegate. Then the audit switches to the
        reference kernels (slower, every tensor kept) and returns a warning saying so.
        """
        from ..export.layout import to_file_layout

        names = list(names)
        x = to_file_layout(x, self.input_info().shape, False)  # torch's N×C×H×W → the file's (NHWC input)
        fetch = [self.output_info()] + [self.info(n) for n in names]
        fast = _BatchRunner(lambda: _interpreter(self.content, self.num_threads, True), [self.input_info()])
        ref = _BatchRunner(lambda: _interpreter(self.content, self.num_threads, False), [self.input_info()])
        a, b = fast.run([x], fetch), ref.run([x], fetch)
        bad = []
        for info, va, vb in zip(fetch, a, b):
            step = float(info.scale.reshape(-1)[0]) if info.quantized else max(float(np.abs(vb).max()), 1e-12) * 2.0 ** -10
            lsb = float(np.abs(va - vb).mean()) / step
            if lsb > max_mean_lsb:
                bad.append((lsb, info.name))
        if not bad:
            return None
        self.delegates = False
        self._runner = None
        worst, name = max(bad)
        # Either the delegate did not keep the tensors (garbage: many codes off) or its kernels round
        # differently from the reference ones and the difference grows along the network (a few codes;
        # MobileNetV3's h-swish). Both make the delegated per-layer values unusable as the file's.
        return (f"at {len(bad)} tensor(s) the XNNPACK run differs from LiteRT's reference kernels by more than "
                f"{max_mean_lsb:g} code on average (up to {worst:.1f} at {name!r}: a tensor the delegate did not "
                "keep, or kernels that round differently); per-layer values come from the reference kernels, "
                "end-to-end figures from XNNPACK")

    # -- isolation ---------------------------------------------------------------------------------
    def segment(self, output: str, boundary: Iterable[str]) -> Segment:
        """The sub-model computing tensor ``output`` from the nearest ``boundary`` tensors / graph inputs."""
        target = self.by_name[output]
        stop = {self.by_name[b] for b in boundary if b in self.by_name} - {target}
        stop |= set(self.inputs)
        ops: set[int] = set()
        inputs: list[int] = []
        todo = [target]
        seen = set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in stop and t != target:
                inputs.append(t)
                continue
            k = self.producer.get(t)
            if k is None:
                continue  # a constant
            ops.add(k)
            todo += [i for i in self.ops[k][1] if i >= 0]
        return Segment(self, sorted(ops), sorted(inputs), target)


class Segment:
    """A runnable one-layer sub-model of a :class:`TFLiteGraph` (see the module docstring)."""

    def __init__(self, graph: TFLiteGraph, ops: list[int], inputs: list[int], output: int):
        self.graph = graph
        self.op_names = [graph.ops[k][0] for k in ops]
        self.inputs = [graph.tensors[i].name for i in inputs]
        self.output = graph.tensors[output].name
        sg = graph.model.subgraphs[0]
        saved = (sg.operators, sg.inputs, sg.outputs, graph.model.signatureDefs)
        try:  # serialise a copy of the flatbuffer object with only this segment's ops
            sg.operators = [saved[0][k] for k in ops]
            sg.inputs = np.asarray(inputs, dtype=np.int32)
            sg.outputs = np.asarray([output], dtype=np.int32)
            graph.model.signatureDefs = []
            content = bytes(graph._fbu.convert_object_to_bytearray(graph.model))
        finally:
            sg.operators, sg.inputs, sg.outputs, graph.model.signatureDefs = saved
        self._runner = _BatchRunner(lambda: _interpreter(content, graph.num_threads, graph.delegates),
                                    [graph.tensors[i] for i in inputs])

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``feeds``: float32 arrays (file layout) for every name in :attr:`inputs`; returns the output, float32."""
        return self._runner.run([feeds[n] for n in self.inputs], [self.graph.info(self.output)])[0]


class _BatchRunner:
    """Runs an interpreter on a whole batch, resizing the batch dimension when the model allows it.

    Exported models often have a fixed batch (litert-torch cannot lower a dynamic batch through a
    flatten); most of their ops still work at any batch. The runner resizes the inputs to the batch
    (``strict=False``) and checks the first sample against a run at the file's own batch size; if
    the resize fails or changes the result it falls back to running chunks of the file's batch size.
    Outputs are fetched as integers and dequantized once per batch.
    """

    def __init__(self, make, inputs: list[TensorInfo]):
        self.make = make
        self.inputs = inputs
        self.fixed = inputs[0].shape[0]
        self.mode: str | None = None  # "any" batch or "fixed"
        self.interpreter = None
        self.batch = None

    def _invoke(self, it, arrays: list[np.ndarray], fetch: list[TensorInfo]) -> list[np.ndarray]:
        details = it.get_input_details()
        for d, info, a in zip(details, self.inputs, arrays):
            it.set_tensor(d["index"], quantize(np.ascontiguousarray(a, dtype=np.float32), info))
        it.invoke()
        return [it.get_tensor(f.index).copy() for f in fetch]

    def _resize(self, it, batch: int) -> None:
        for d, info in zip(it.get_input_details(), self.inputs):
            it.resize_tensor_input(d["index"], [batch, *info.shape[1:]], strict=False)
        it.allocate_tensors()

    def _fixed_run(self, arrays, fetch):
        if self.batch != self.fixed:
            self.interpreter = self.make()
            self._resize(self.interpreter, self.fixed)
            self.batch = self.fixed
        n, b = len(arrays[0]), self.fixed
        parts = []
        for s in range(0, n, b):
            chunk = [a[s:s + b] for a in arrays]
            k = len(chunk[0])
            if k < b:  # pad the last chunk with copies of its first sample
                chunk = [np.concatenate([c, np.repeat(c[:1], b - k, 0)]) for c in chunk]
            parts.append([o[:k] for o in self._invoke(self.interpreter, chunk, fetch)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(fetch))]

    def run(self, arrays: list[np.ndarray], fetch: list[TensorInfo]) -> list[np.ndarray]:
        n = len(arrays[0])
        if self.mode is None:
            self.mode = "fixed"
            if n != self.fixed:
                try:
                    it = self.make()
                    self._resize(it, n)
                    got = self._invoke(it, arrays, fetch)
                    check = self._fixed_run([a[: self.fixed] for a in arrays], fetch)
                    if all(np.array_equal(g[: len(c)], c) for g, c in zip(got, check)):
                        self.mode, self.interpreter, self.batch = "any", it, n
                        return [dequantize(g, f) for g, f in zip(got, fetch)]
                except (RuntimeError, ValueError):
                    pass
        if self.mode == "any":
            if self.batch != n:
                self._resize(self.interpreter, n)
                self.batch = n
            raw = self._invoke(self.interpreter, arrays, fetch)
        else:
            raw = self._fixed_run(arrays, fetch)
        return [dequantize(r, f) for r, f in zip(raw, fetch)]
