"""Runtimes: run exported files in the real interpreters (LiteRT / TFLite, ONNX Runtime CPU).

``open_runner(path)`` picks the runner from the file's content; both runners take float32 N×C×H×W
batches and return float32 outputs (int8 I/O is quantized / dequantized with the file's own parameters).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..export.artifact import check_model_file, read_model_bytes
from .onnx import OrtRunner, load_onnx_model, with_intermediate_outputs
from .tflite import TensorInfo, TFLiteRunner, _is_onnx, check_tflite_file, interpreter_class

__all__ = [
    "TFLiteRunner",
    "OrtRunner",
    "TensorInfo",
    "open_runner",
    "interpreter_class",
    "check_tflite_file",
    "load_onnx_model",
    "with_intermediate_outputs",
]


def open_runner(path: str | Path, num_threads: int = 1, preserve_all_tensors: bool = False):
    """A :class:`TFLiteRunner` or :class:`OrtRunner` for ``path``, chosen by content (not suffix).
    :class:`InputError` for a missing file, one that is not a regular file or one over 2 GiB
    (:func:`mobilequant.export.artifact.check_model_file`), checked before it is read."""
    path = Path(path)
    check_model_file(path)  # before opening it: a pipe would block the open, /dev/zero the read below
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"cannot read model {path}: {e.strerror or e}") from None
    if head[4:8] == b"TFL3":
        return TFLiteRunner(path, num_threads=num_threads, preserve_all_tensors=preserve_all_tensors)
    if path.suffix.lower() == ".tflite" and not _is_onnx(read_model_bytes(path)):
        check_tflite_file(path)  # raises the TFLite-specific message
    return OrtRunner(path, num_threads=num_threads)
