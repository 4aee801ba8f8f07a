"""Run a ``.tflite`` file in the LiteRT / TFLite interpreter.

:func:`interpreter_class` finds an interpreter: ``ai_edge_litert`` (installed with mobilequant) first,
then ``tflite_runtime``, then ``tensorflow.lite``; none → :class:`InputError` saying what to install.
The default op resolver applies the XNNPACK delegate, as on a phone. With ``preserve_all_tensors=True``
default delegates are turned off so that every intermediate tensor keeps its value (XNNPACK fuses and
frees them); outputs are the same kernels' results either way up to kernel choice.

:class:`TFLiteRunner` takes float32 N×C×H×W input whatever the file wants: it transposes to NHWC when the
file's input is NHWC, quantizes with the input tensor's scale / zero point when the input is int8, runs
image by image (files have a fixed batch of one) and returns float32 (dequantized) outputs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..export.artifact import read_model_bytes

__all__ = ["interpreter_class", "TFLiteRunner", "TensorInfo", "check_tflite_file"]

_INTERPRETERS = (
    ("ai_edge_litert.interpreter", "Interpreter"),
    ("tflite_runtime.interpreter", "Interpreter"),
    ("tensorflow.lite", "Interpreter"),
)
_TFLITE_IDENTIFIER = b"TFL3"


def interpreter_class():
    """The first importable TFLite interpreter class (ai_edge_litert, tflite_runtime, tensorflow.lite)."""
    tried = []
    for module, attr in _INTERPRETERS:
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError:
            tried.append(module.split(".")[0])
    raise InputError(
        "no TFLite interpreter is installed (tried " + ", ".join(tried) + "); "
        "install one: pip install ai-edge-litert"
    )


def _resolver_without_delegates(cls):
    """``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`` of the interpreter's package, if it has one."""
    module = importlib.import_module(cls.__module__)
    resolver = getattr(module, "OpResolverType", None)
    return None if resolver is None else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def check_tflite_file(path: str | Path) -> bytes:
    """The file's bytes, or :class:`InputError` naming the file when it is missing, not a regular file, over
    2 GiB (:func:`mobilequant.export.artifact.check_model_file`) or not a TFLite model."""
    path = Path(path)
    data = read_model_bytes(path, "TFLite model")
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        if _is_onnx(data):
            raise InputError(f"{path} is not a TFLite model: it is an ONNX model (name it .onnx)")
        raise InputError(f"{path} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
    return data


def _is_onnx(data: bytes) -> bool:
    """Whether ``data`` parses as an ONNX model with a graph (for the message about a misnamed file)."""
    try:
        import onnx

        return len(onnx.load_model_from_string(data).graph.node) > 0
    except Exception:  # noqa: BLE001 - any parse failure: not ONNX
        return False


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an interpreter, with its quantization (empty ``scales`` when not quantized)."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    axis: int | None

    @property
    def quantized(self) -> bool:
        return len(self.scales) > 0


def _tensor_info(d: dict) -> TensorInfo:
    qp = d.get("quantization_parameters") or {}
    scales = tuple(float(s) for s in np.asarray(qp.get("scales", ())).reshape(-1))
    zps = tuple(int(z) for z in np.asarray(qp.get("zero_points", ())).reshape(-1))
    axis = int(qp.get("quantized_dimension", 0)) if len(scales) > 1 else None
    return TensorInfo(int(d["index"]), str(d["name"]), np.dtype(d["dtype"]).name,
                      tuple(int(s) for s in d["shape"]), scales, zps, axis)


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Quantize float input for an int8 input tensor.

    Same arithmetic as the torch simulation's ``quantize_per_tensor`` (``round(x * (1/scale)) + zp``,
    round half to even, in float32), so int8-I/O files see exactly the integers the simulation saw.
    """
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) * np.float32(1.0 / scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_array(q: np.ndarray, scales, zero_points, axis: int | None) -> np.ndarray:
    scales = np.asarray(scales, dtype=np.float32)
    zps = np.asarray(zero_points, dtype=np.float32)
    if axis is not None and scales.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scales, zps = scales.reshape(shape), zps.reshape(shape)
    return (q.astype(np.float32) - zps) * scales


class TFLiteRunner:
    """A loaded ``.tflite`` file.

    ``run(x)``: ``x`` float32 N×C×H×W → float32 outputs (first output, or all with ``all_outputs``).
    ``tensors()``: every tensor with its quantization; ``intermediates()`` / ``tensor(name)``: values
    after the last ``run`` (last image), dequantized, in the file's layout — needs
    ``preserve_all_tensors=True``.
    """

    def __init__(self, path: str | Path, num_threads: int = 1, preserve_all_tensors: bool = False):
        self.path = Path(path)
        content = check_tflite_file(self.path)
        cls = interpreter_class()
        kwargs = {"model_content": content, "num_threads": num_threads}
        if preserve_all_tensors:
            kwargs["experimental_preserve_all_tensors"] = True
            resolver = _resolver_without_delegates(cls)
            if resolver is not None:
                kwargs["experimental_op_resolver_type"] = resolver
        try:
            self.interpreter = cls(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot load TFLite model {self.path}: {first}") from None
        self.preserve_all_tensors = preserve_all_tensors
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        if len(self._inputs) != 1:
            raise InputError(f"{self.path}: expected one input tensor, found {len(self._inputs)}")
        self.input = _tensor_info(self._inputs[0])
        self.outputs = [_tensor_info(d) for d in self._outputs]

    # ----------------------------------------------------------------------------------- layout
    def input_layout(self, chw: tuple[int, int, int]) -> str:
        """``"NCHW"`` or ``"NHWC"``: how an image of shape ``chw`` maps onto the file's input."""
        shape = self.input.shape[1:]
        c, h, w = chw
        if tuple(shape) == (c, h, w):
            return "NCHW"
        if tuple(shape) == (h, w, c):
            return "NHWC"
        raise InputError(f"{self.path}: input of shape {tuple(self.input.shape)} does not take images of "
                         f"{c}×{h}×{w}")

    def _prepare(self, image: np.ndarray, layout: str) -> np.ndarray:
        x = image[None].astype(np.float32)
        if layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if self.input.quantized and self.input.dtype in ("int8", "uint8", "int16"):
            x = quantize_array(x, self.input.scales[0], self.input.zero_points[0], np.dtype(self.input.dtype))
        return np.ascontiguousarray(x)

    def _read(self, info: TensorInfo) -> np.ndarray:
        y = self.interpreter.get_tensor(info.index)
        if info.quantized and np.issubdtype(y.dtype, np.integer):
            y = dequantize_array(y, info.scales, info.zero_points, info.axis)
        return np.asarray(y, dtype=np.float32).copy()

    # -------------------------------------------------------------------------------------- run
    def run(self, x, all_outputs: bool = False):
        """Outputs for a float32 N×C×H×W batch (a torch tensor or array), one image at a time."""
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
        if x.ndim != 4:
            raise InputError(f"expected an N×C×H×W batch, got shape {tuple(x.shape)}")
        layout = self.input_layout(tuple(x.shape[1:]))
        results = [[] for _ in self.outputs]
        for image in x:
            self.interpreter.set_tensor(self.input.index, self._prepare(image, layout))
            self.interpreter.invoke()
            for k, info in enumerate(self.outputs):
                results[k].append(self._read(info))
        outs = [np.concatenate(r) if r else np.zeros((0,), np.float32) for r in results]
        return outs if all_outputs else outs[0]

    # ---------------------------------------------------------------------------------- tensors
    def tensors(self) -> list[TensorInfo]:
        return [_tensor_info(d) for d in self.interpreter.get_tensor_details()]

    def tensor(self, name: str) -> np.ndarray:
        """A tensor's value after the last ``run`` (dequantized float32), by its name in the file."""
        for info in self.tensors():
            if info.name == name:
                return self._intermediate(info)
        raise InputError(f"{self.path} has no tensor named {name!r}")

    def _intermediate(self, info: TensorInfo) -> np.ndarray:
        if not self.preserve_all_tensors:
            raise InputError("intermediate tensors need TFLiteRunner(..., preserve_all_tensors=True)")
        return self._read(info)

    def intermediates(self, names=None) -> dict[str, np.ndarray]:
        """Values of (the named, or all non-constant) tensors after the last ``run``."""
        wanted = None if names is None else set(names)
        out = {}
        for info in self.tensors():
            if wanted is not None and info.name not in wanted:
                continue
            try:
                out[info.name] = self._intermediate(info)
            except ValueError:  # tensors without data (e.g. optional inputs)
                continue
        return out
