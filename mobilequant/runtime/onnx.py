"""Run a ``.onnx`` file in ONNX Runtime (CPU).

:class:`OrtRunner` takes float32 N×C×H×W input (the whole batch at once: exported graphs have a dynamic
batch dimension; a file with a fixed batch of one is run image by image) and returns float32 outputs.
:func:`with_intermediate_outputs` returns a copy of a model in which chosen intermediate tensors are
also graph outputs, so ``OrtRunner(copy).run(x, all_outputs=True)`` returns them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..export.artifact import read_model_bytes

__all__ = ["OrtRunner", "load_onnx_model", "with_intermediate_outputs"]


def load_onnx_model(path: str | Path):
    """``onnx.ModelProto`` of a file, or :class:`InputError` naming the file when it is not a model."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    data = read_model_bytes(path, "ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is not an ONNX model ({type(e).__name__}: truncated or corrupt)") from None
    if not model.graph.node or not model.graph.output:
        raise InputError(f"{path} is not an ONNX model (no graph)")
    return model


def _session(model_bytes: bytes, num_threads: int, label: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every load failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load ONNX model {label}: {first}") from None


class OrtRunner:
    """A loaded ``.onnx`` file (or ``onnx.ModelProto``) on onnxruntime's CPU provider."""

    def __init__(self, path_or_model, num_threads: int = 1):
        if isinstance(path_or_model, (str, Path)):
            self.path = Path(path_or_model)
            self.model = load_onnx_model(self.path)
            label = str(self.path)
        else:
            self.path = None
            self.model = path_or_model
            label = f"<{getattr(path_or_model.graph, 'name', 'model')}>"
        self.session = _session(self.model.SerializeToString(), num_threads, label)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"{label}: expected one input, found {len(inputs)}")
        self.input = inputs[0]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def input_layout(self, chw: tuple[int, int, int]) -> str:
        shape = list(self.input.shape[1:])
        c, h, w = chw
        if shape == [c, h, w] or any(not isinstance(s, int) for s in shape):
            return "NCHW"
        if shape == [h, w, c]:
            return "NHWC"
        raise InputError(f"ONNX input of shape {self.input.shape} does not take images of {c}×{h}×{w}")

    def run(self, x, all_outputs: bool = False):
        """Float32 outputs for a float32 N×C×H×W batch (torch tensor or array)."""
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
        if x.ndim != 4:
            raise InputError(f"expected an N×C×H×W batch, got shape {tuple(x.shape)}")
        if self.input_layout(tuple(x.shape[1:])) == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x)
        batch = self.input.shape[0]
        if isinstance(batch, int) and batch != x.shape[0]:  # fixed batch: one image at a time
            parts = [self.session.run(None, {self.input.name: x[i:i + 1]}) for i in range(x.shape[0])]
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names))]
        else:
            outs = self.session.run(None, {self.input.name: x})
        outs = [np.asarray(o, dtype=np.float32) if np.issubdtype(np.asarray(o).dtype, np.floating) else o
                for o in outs]
        return outs if all_outputs else outs[0]

    def outputs_by_name(self, x) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(x, all_outputs=True)))


def with_intermediate_outputs(model, names):
    """A copy of ``model`` whose graph also outputs the named intermediate tensors (types inferred)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    produced = {out for n in copy.graph.node for out in n.output}
    missing = [n for n in names if n not in produced]
    if missing:
        raise InputError(f"the model has no intermediate tensor(s) {', '.join(map(repr, missing[:5]))}")
    try:
        inferred = onnx.shape_inference.infer_shapes(copy)
    except Exception:  # shape inference is best-effort; fall back to declared value_info
        inferred = copy
    known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    for name in names:
        if name in existing:
            continue
        vi = known.get(name)
        if vi is None:
            vi = onnx.helper.make_empty_tensor_value_info(name)
        copy.graph.output.append(vi)
        existing.add(name)
    return copy
