"""Latency of an artifact in its own runtime: the direct metric (FLOPs are not speed — ShuffleNetV2's
lesson). One image at a time, fixed thread count, warm-up runs discarded, median and spread reported."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError

__all__ = ["Latency", "measure_latency"]


@dataclass
class Latency:
    path: str
    runtime: str
    threads: int
    runs: int
    size_bytes: int
    median_ms: float
    min_ms: float
    max_ms: float
    p90_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


# ONNX Runtime's input type names → numpy (what a random input of that type is made of)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
              "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _input_array(shape, dtype: np.dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def measure_latency(path: str | Path, threads: int = 1, runs: int = 100, warmup: int = 10,
                    seed: int = 0) -> Latency:
    """Time ``runs`` single-image invocations of the file (after ``warmup`` untimed ones)."""
    from . import OrtRunner, TFLiteRunner, open_runner

    if threads < 1 or runs < 1 or warmup < 0:
        raise UsageError(f"threads and runs must be at least 1 and warmup at least 0 "
                         f"(got {threads}, {runs}, {warmup})")
    path = Path(path)
    try:
        runner = open_runner(path, num_threads=threads)
    except InputError:
        # open_runner tries ONNX for anything that is not TFLite, so a stray file (`bench notes.txt`)
        # read "is not an ONNX model"; bench takes either, so say so unless the name says which was meant
        if path.suffix.lower() in (".tflite", ".onnx") or not path.is_file():
            raise
        raise InputError(f"{path} is not a TFLite or ONNX model (by its content)") from None
    if isinstance(runner, TFLiteRunner):
        interp, inp = runner.interpreter, runner.input
        interp.set_tensor(inp.index, _input_array(inp.shape, np.dtype(inp.dtype), seed))

        def once():
            interp.invoke()

        name = "litert"
    else:
        assert isinstance(runner, OrtRunner)
        node = runner.input
        dtype = _ORT_TYPES.get(node.type)
        if dtype is None:
            raise InputError(f"{path}: input {node.name!r} is {node.type}, which bench cannot fill")
        feed = {node.name: _input_array(node.shape, np.dtype(dtype), seed)}
        session = runner.session

        def once():
            session.run(None, feed)

        name = "onnxruntime"
    for _ in range(warmup):
        once()
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        once()
        times[i] = (time.perf_counter() - t) * 1e3
    return Latency(str(path), name, threads, runs, path.stat().st_size, float(np.median(times)),
                   float(times.min()), float(times.max()), float(np.percentile(times, 90)))
