"""Run an exported file for verification.

Minimal on purpose: verification is part of the export stage, and the stage order
(``tests/test_layering.py``: export → runtime) forbids importing :mod:`mobilequant.runtime` here. It runs
the same libraries the runtime wraps (ai-edge-litert, onnxruntime — both hard dependencies) with the same
input handling (float32 N×C×H×W in; int8 inputs quantized like the torch simulation quantizes).
"""

from __future__ import annotations

import numpy as np

__all__ = ["onnx_runtime_ops", "run_onnx_model", "run_tflite_bytes"]


def run_tflite_bytes(data: bytes, x: np.ndarray, layout: str, num_threads: int = 1,
                     builtin_kernels: bool = False) -> np.ndarray:
    """First output of a TFLite model for a float32 N×C×H×W batch (dequantized), image by image; with
    ``builtin_kernels`` in LiteRT's own kernels instead of the default XNNPACK delegate."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin_kernels else {}
    interp = Interpreter(model_content=data, num_threads=num_threads, **kwargs)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    if layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    results = []
    for image in np.ascontiguousarray(x, dtype=np.float32):
        v = image[None]
        if inp["dtype"] == np.int8:
            v = np.clip(np.round(v * np.float32(1.0 / in_scale)) + in_zp, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], v)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            y = (y.astype(np.float32) - out_zp) * np.float32(out_scale)
        results.append(np.asarray(y, dtype=np.float32).copy())
    return np.concatenate(results)


def run_onnx_model(data: bytes, x: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """First output of an ONNX model for a float32 N×C×H×W batch (onnxruntime CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)]
    return np.concatenate(outs).astype(np.float32)


def onnx_runtime_ops(data: bytes) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime (CPU) runs for an ONNX model: its QDQ fusions (QLinearConv,
    QGemm, QLinearAdd, ...) applied, before the hardware-specific layout passes."""
    import os
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="mq-ort-") as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))
